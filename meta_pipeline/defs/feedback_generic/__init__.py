"""Generic feedback (any model whose outputs are rated): assets, check and sensors, per `task`."""
