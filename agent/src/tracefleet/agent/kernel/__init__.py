"""What talks to the kernel: the libbpf binding, the record ABI of ``bpf/include``, host
checks, mounts and the filter maps. Imports nothing else of the agent but ``env``."""
