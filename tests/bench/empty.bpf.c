// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* The benchmark floor: programs that do nothing, on the tracepoints tracefleet uses. The cost
 * they add is the price of having any BPF program on a syscall tracepoint at all. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

#define EMPTY(tp)                                                \
	SEC("tracepoint/syscalls/" #tp) int empty_##tp(void *ctx) \
	{                                                        \
		return 0;                                        \
	}

EMPTY(sys_enter_openat)
EMPTY(sys_exit_openat)
EMPTY(sys_enter_close)
EMPTY(sys_exit_close)
EMPTY(sys_enter_connect)
EMPTY(sys_exit_connect)

char LICENSE[] SEC("license") = "GPL";
