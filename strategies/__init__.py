"""Server side of the Flower app: the CompAMS strategy and the ServerApp."""
