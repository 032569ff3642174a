"""Client side of the Flower app: the COMP-AMS ClientApp, local training and client state."""
