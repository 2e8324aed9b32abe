/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* tracefleet: syscall arguments from a tracepoint context or from the pt_regs of fentry on
 * the syscall function, into one array. */
#ifndef __TRACEFLEET_ARGS_BPF_H
#define __TRACEFLEET_ARGS_BPF_H

#include "tracefleet/common.bpf.h"

/*
 * Copy the first `n` syscall arguments. A syscall tracepoint's record holds only the
 * arguments the syscall has, and the kernel refuses to attach a program that reads past the
 * record (EACCES), so `n` must be the syscall's real argument count.
 */
static __always_inline void tf_tp_args(unsigned long *a, struct trace_event_raw_sys_enter *ctx,
				       const int n)
{
	/* constant offsets: the verifier refuses ctx access through a moved pointer */
	a[0] = n > 0 ? ctx->args[0] : 0;
	a[1] = n > 1 ? ctx->args[1] : 0;
	a[2] = n > 2 ? ctx->args[2] : 0;
	a[3] = n > 3 ? ctx->args[3] : 0;
	a[4] = n > 4 ? ctx->args[4] : 0;
	a[5] = n > 5 ? ctx->args[5] : 0;
}

#if defined(__TARGET_ARCH_x86)
#define TF_SYSCALL_FN(name) "__x64_sys_" #name
#elif defined(__TARGET_ARCH_arm64)
#define TF_SYSCALL_FN(name) "__arm64_sys_" #name
#endif

static __always_inline void tf_regs_args(unsigned long *a, struct pt_regs *regs)
{
	a[0] = PT_REGS_PARM1_CORE_SYSCALL(regs);
	a[1] = PT_REGS_PARM2_CORE_SYSCALL(regs);
	a[2] = PT_REGS_PARM3_CORE_SYSCALL(regs);
	a[3] = PT_REGS_PARM4_CORE_SYSCALL(regs);
	a[4] = PT_REGS_PARM5_CORE_SYSCALL(regs);
	a[5] = 0;
}

#endif /* __TRACEFLEET_ARGS_BPF_H */
