"""The controller's adapters: the agent and control gRPC services, authentication and
authorization, TLS, Kubernetes token review, /metrics. They stand on ``domain``."""
