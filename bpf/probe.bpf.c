// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * tracefleet feature probes: one tiny program per kernel capability a rung of the capture
 * ladder (or a vfs hook) needs, each using the same program type, attach point kind and
 * helpers as the real programs. The agent loads each alone and attaches it to its one hook,
 * so learning what the kernel allows costs milliseconds instead of verifying and attaching
 * every event set at every rung. No maps: nothing here is shared with the event sets.
 *
 * The hook is acct(2) (rarely called, takes a user pointer) and vfs_truncate.
 */
#include "vmlinux.h"
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#if defined(__TARGET_ARCH_x86)
#define PROBE_SYSCALL_FN "__x64_sys_acct"
#elif defined(__TARGET_ARCH_arm64)
#define PROBE_SYSCALL_FN "__arm64_sys_acct"
#endif

extern int bpf_copy_from_user_str(void *dst, __u32 dst__sz, const void *unsafe_ptr__ign,
				  __u64 flags) __weak __ksym;

/* exit-retry, nofault, user-fallback, vfs `tracepoint`: a syscall tracepoint with nofault
 * user reads */
SEC("tp/syscalls/sys_enter_acct")
int probe_tracepoint(struct trace_event_raw_sys_enter *ctx)
{
	char buf[16];

	bpf_probe_read_user_str(buf, sizeof(buf), (void *)ctx->args[0]);
	return 0;
}

/* sleepable: the same tracepoint, loaded with BPF_F_SLEEPABLE by the agent, with the
 * faulting copies the sleepable programs use */
SEC("tp/syscalls/sys_enter_acct")
int probe_sleepable(struct trace_event_raw_sys_enter *ctx)
{
	char buf[16];

	bpf_copy_from_user_str(buf, sizeof(buf), (void *)ctx->args[0], 0);
	bpf_copy_from_user(buf, sizeof(buf), (void *)ctx->args[0]);
	return 0;
}

/* fentry-sleepable: fentry.s on the syscall function */
SEC("fentry.s/" PROBE_SYSCALL_FN)
int BPF_PROG(probe_fentry_sleepable, struct pt_regs *regs)
{
	char buf[16];
	unsigned long name = PT_REGS_PARM1_CORE_SYSCALL(regs);

	bpf_copy_from_user_str(buf, sizeof(buf), (void *)name, 0);
	bpf_copy_from_user(buf, sizeof(buf), (void *)name);
	return 0;
}

/* vfs `fentry`: trampolines on a vfs function, with the return value */
SEC("fexit/vfs_truncate")
int BPF_PROG(probe_fentry, const struct path *path, loff_t length)
{
	__u64 ret = 0;

	bpf_get_func_ret(ctx, &ret);
	return 0;
}

/* vfs `fentry` open: bpf_d_path where the kernel allows it */
SEC("fentry/security_file_open")
int BPF_PROG(probe_d_path, struct file *file)
{
	char buf[16];

	bpf_d_path((struct path *)&file->f_path, buf, sizeof(buf));
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
