// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * tracefleet: process-tree follow (--pid P --follow, like strace -f). Keeps tf_follow (shared
 * with every event set's object, see common.bpf.h) current in the kernel, so a child is
 * followed from its first instruction, before user space could learn it exists. Raw
 * tracepoints: they take the task pointers (the child's tgid tells a thread from a process)
 * and need no BPF trampoline, which some hosts refuse.
 */
#include "tracefleet/common.bpf.h"

/* children not followed because tf_follow was full (the agent reports it) */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} tf_follow_full SEC(".maps");

SEC("raw_tp/sched_process_fork")
int tf_follow_fork(struct bpf_raw_tracepoint_args *ctx)
{
	struct task_struct *parent = (struct task_struct *)ctx->args[0];
	struct task_struct *child = (struct task_struct *)ctx->args[1];
	__u32 ptgid = BPF_CORE_READ(parent, tgid);
	__u32 ctgid = BPF_CORE_READ(child, tgid);
	__u32 cpid = BPF_CORE_READ(child, pid);

	if (cpid != ctgid) /* a new thread: its process is already followed or not */
		return 0;
	__u64 *sets = bpf_map_lookup_elem(&tf_follow, &ptgid);
	if (!sets)
		return 0;
	__u64 v = *sets;
	if (bpf_map_update_elem(&tf_follow, &ctgid, &v, BPF_ANY)) {
		__u32 zero = 0;
		__u64 *full = bpf_map_lookup_elem(&tf_follow_full, &zero);

		if (full)
			__sync_fetch_and_add(full, 1);
	}
	return 0;
}

SEC("raw_tp/sched_process_exit")
int tf_follow_exit(struct bpf_raw_tracepoint_args *ctx)
{
	struct task_struct *task = (struct task_struct *)ctx->args[0];
	__u32 tgid = BPF_CORE_READ(task, tgid);

	/* the group's live count is decremented before this tracepoint: 0 = last thread */
	if (BPF_CORE_READ(task, signal, live.counter) == 0)
		bpf_map_delete_elem(&tf_follow, &tgid);
	return 0;
}
