"""What the operator CLI and the server share: environment variables, addresses, selectors,
certificates and config files. Imports nothing else of the controller."""
