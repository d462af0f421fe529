"""What runs on a device: the ClientApp, personalization algorithms, personal state."""
