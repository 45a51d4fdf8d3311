"""What a PC's firmware leaves in guest memory for the OS: platform description tables."""
