"""Client side of the Flower app: the COMP-AMS ClientApp and client state I/O."""
