"""What a Flower Deployment Engine federation needs on disk: TLS certificates and SuperNode keys."""
