// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * tracefleet event set `exec`: execve and execveat, with the filename and argv.
 *
 * The exit retry cannot work for a successful exec: at sys_exit the old address space is
 * gone. So the non-sleepable strategies recover at sched_process_exec instead, where the
 * kernel's own copy of the filename is in the tracepoint and argv has just been written to
 * the new stack (mm->arg_start..arg_end, resident). A failed exec keeps its address space,
 * so its exit retry reads the old pointers again.
 */
#include "tracefleet/common.bpf.h"
#include "tracefleet/args.bpf.h"
#include "tracefleet/exe.bpf.h"

#define SET TF_SET_EXEC

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024); /* resized by the agent */
	__type(key, __u32); /* tid */
	__type(value, struct tf_exec_event);
} tf_exec_inflight SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tf_exec_event);
} tf_zero_exec SEC(".maps");

static __always_inline void tf_argv_fail(struct tf_exec_event *e, long err, bool at_entry)
{
	e->argv_err = err;
	e->argv_status = at_entry && tf_cfg.strategy == TF_STRAT_EXIT_RETRY ? TF_ST_PENDING
									      : TF_ST_LOST;
}

/* Read argv through the user's pointer array (entry, or exit of a failed exec). */
static __always_inline void tf_read_argv(struct tf_exec_event *e, unsigned long argv, bool sleepable,
					 __u8 ok_status, __u8 strategy)
{
	e->argv_uptr = argv;
	e->argv_strategy = strategy;
	e->argc = 0;
	if (!argv) {
		e->argv_status = TF_ST_NONE;
		return;
	}
	e->argv_status = ok_status;
	for (int i = 0; i < TF_ARGV_COUNT; i++) {
		unsigned long p = 0;
		long r;

		if (sleepable)
			r = bpf_copy_from_user(&p, sizeof(p), (void *)(argv + i * sizeof(p)));
		else
			r = bpf_probe_read_user(&p, sizeof(p), (void *)(argv + i * sizeof(p)));
		if (r < 0) {
			tf_argv_fail(e, r, ok_status == TF_ST_OK);
			return;
		}
		if (!p)
			return;
		if (sleepable)
			r = bpf_copy_from_user_str(e->argv[i], TF_ARG_MAX, (void *)p, 0);
		else
			r = bpf_probe_read_user_str(e->argv[i], TF_ARG_MAX, (void *)p);
		if (r < 0) {
			tf_argv_fail(e, r, ok_status == TF_ST_OK);
			return;
		}
		e->arg_len[i] = r - 1;
		e->argc = i + 1;
		if (r >= TF_ARG_MAX)
			e->argv_status = TF_ST_TRUNCATED;
	}
	/* more entries than we keep? */
	unsigned long more = 0;
	bpf_probe_read_user(&more, sizeof(more), (void *)(argv + TF_ARGV_COUNT * sizeof(more)));
	if (more)
		e->argv_status = TF_ST_TRUNCATED;
}

static __always_inline int tf_exec_enter(const unsigned long *a, __u16 sc, int fname_idx,
					 int argv_idx, bool sleepable)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)id, zero = 0;
	struct tf_exec_event *e, *tmpl;

	if (!tf_should_trace(SET, id >> 32))
		return 0;
	tf_count(SET, TF_STAT_PASSED);
	tmpl = bpf_map_lookup_elem(&tf_zero_exec, &zero);
	if (!tmpl)
		return 0;
	if (!tf_inflight_insert(&tf_exec_inflight, &tid, tmpl, SET))
		return 0;
	e = bpf_map_lookup_elem(&tf_exec_inflight, &tid);
	if (!e)
		return 0;
	tf_fill_hdr(&e->hdr, TF_KIND_EXEC, SET, sc);
	for (int i = 0; i < 6; i++)
		e->iargs[i] = a[i];
	tf_read_str_entry(&e->filename, a[fname_idx], sleepable);
	tf_read_argv(e, a[argv_idx], sleepable, TF_ST_OK, tf_cfg.strategy);
	return 0;
}

/* The new image is in place: recover what faulted at entry from the kernel's copies. */
SEC("tp/sched/sched_process_exec")
int tp_sched_exec(struct trace_event_raw_sched_process_exec *ctx)
{
	__u32 old_tid = ctx->old_pid, tid = ctx->pid;
	struct tf_exec_event *e = bpf_map_lookup_elem(&tf_exec_inflight, &old_tid);

	if (!e)
		return 0;
	if (e->filename.status == TF_ST_PENDING) {
		unsigned int loc = ctx->__data_loc_filename & 0xFFFF;
		long n = bpf_probe_read_kernel_str(e->filename.data, sizeof(e->filename.data),
						   (void *)ctx + loc);
		e->filename.strategy = TF_STRAT_EXIT_RETRY;
		if (n < 0) {
			e->filename.err = n;
			e->filename.status = TF_ST_LOST;
		} else {
			e->filename.err = 0;
			e->filename.len = n > 0 ? n - 1 : 0;
			e->filename.status = n >= TF_PATH_MAX ? TF_ST_TRUNCATED : TF_ST_RECOVERED;
		}
	}
	if (e->argv_status == TF_ST_PENDING) {
		struct task_struct *task = (struct task_struct *)bpf_get_current_task();
		unsigned long p = BPF_CORE_READ(task, mm, arg_start);
		unsigned long end = BPF_CORE_READ(task, mm, arg_end);

		e->argv_strategy = TF_STRAT_EXIT_RETRY;
		e->argv_status = TF_ST_RECOVERED;
		e->argc = 0;
		for (int i = 0; i < TF_ARGV_COUNT; i++) {
			if (p >= end)
				break;
			long r = bpf_probe_read_user_str(e->argv[i], TF_ARG_MAX, (void *)p);

			if (r <= 0) {
				e->argv_err = r;
				e->argv_status = TF_ST_LOST;
				break;
			}
			e->arg_len[i] = r - 1;
			e->argc = i + 1;
			p += r;
			if (r >= TF_ARG_MAX) {
				e->argv_status = TF_ST_TRUNCATED;
				break;
			}
		}
		if (e->argv_status == TF_ST_RECOVERED && p < end)
			e->argv_status = TF_ST_TRUNCATED;
	}
	if (old_tid != tid) {
		/* exec from a non-leader thread: it now runs under the leader's id (the leader's
		 * own slot, if any, belongs to a call that died with it) */
		if (bpf_map_update_elem(&tf_exec_inflight, &tid, e, BPF_ANY))
			tf_count(SET, TF_STAT_INFLIGHT_FULL);
		bpf_map_delete_elem(&tf_exec_inflight, &old_tid);
	}
	return 0;
}

/* The record: hdr and iargs, filename, the argv head, then each argument as a __u16 length
 * and its bytes. */
static __always_inline void tf_emit_exec(struct tf_exec_event *e)
{
	__u32 lf = tf_str_out_len(&e->filename), size, argc = e->argc;
	struct tf_rec r;

	if (argc > TF_ARGV_COUNT)
		argc = e->argc = TF_ARGV_COUNT;
	size = offsetof(struct tf_exec_event, filename) + TF_STRH_SIZE + lf + TF_ARGVH_SIZE;
	for (int i = 0; i < TF_ARGV_COUNT; i++) {
		if (i >= argc)
			break;
		if (e->arg_len[i] > TF_ARG_MAX - 1)
			e->arg_len[i] = TF_ARG_MAX - 1;
		size += sizeof(__u16) + e->arg_len[i];
	}
	if (!tf_rec_begin(&r, SET, size))
		return;
	tf_rec_fixed_str(&r, e, offsetof(struct tf_exec_event, filename), lf, TF_PATH_MAX - 1);
	tf_rec_put(&r, &e->argv_uptr, TF_ARGVH_SIZE);
	for (int i = 0; i < TF_ARGV_COUNT; i++) {
		__u64 n;

		if (i >= argc)
			break;
		n = e->arg_len[i];
		tf_rec_put(&r, &e->arg_len[i], sizeof(__u16));
		tf_barrier_var(n);
		if (n > TF_ARG_MAX - 1)
			n = TF_ARG_MAX - 1;
		tf_rec_put(&r, e->argv[i], n);
	}
	tf_rec_end(&r, SET);
}

static __always_inline int tf_exec_exit(long ret)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct tf_exec_event *e = bpf_map_lookup_elem(&tf_exec_inflight, &tid);

	if (!e)
		return 0;
	e->hdr.ret = ret;
	e->hdr.exit_ns = bpf_ktime_get_ns();
	if (ret < 0 && tf_cfg.strategy == TF_STRAT_EXIT_RETRY) {
		/* failed exec: the old address space is still ours */
		tf_retry_str(&e->filename);
		if (e->argv_status == TF_ST_PENDING)
			tf_read_argv(e, e->argv_uptr, false, TF_ST_RECOVERED, TF_STRAT_EXIT_RETRY);
	}
	if (e->filename.status == TF_ST_PENDING)
		e->filename.status = TF_ST_LOST;
	if (e->argv_status == TF_ST_PENDING)
		e->argv_status = TF_ST_LOST;
	if (!tf_prefix_ok(SET, &e->filename)) {
		tf_count(SET, TF_STAT_FILTERED);
		tf_count(SET, TF_STAT_PREFIX_FILTERED);
		bpf_map_delete_elem(&tf_exec_inflight, &tid);
		return 0;
	}
	tf_count_status(SET, e->filename.status);
	tf_count_status(SET, e->argv_status);
	tf_fill_exe(&e->hdr, SET); /* at exit: the new image once the exec succeeded */
	tf_emit_exec(e);
	bpf_map_delete_elem(&tf_exec_inflight, &tid);
	return 0;
}

#define TF_EXEC(name, nargs, sc, fname_idx, argv_idx)                                               \
	SEC("tp/syscalls/sys_enter_" #name)                                                   \
	int tp_enter_##name(struct trace_event_raw_sys_enter *ctx)                            \
	{                                                                                     \
		unsigned long a[6];                                                           \
		tf_tp_args(a, ctx, nargs);                                                           \
		return tf_exec_enter(a, sc, fname_idx, argv_idx, false);                      \
	}                                                                                     \
	SEC("tp/syscalls/sys_enter_" #name)                                                   \
	int tps_enter_##name(struct trace_event_raw_sys_enter *ctx)                           \
	{                                                                                     \
		unsigned long a[6];                                                           \
		tf_tp_args(a, ctx, nargs);                                                           \
		return tf_exec_enter(a, sc, fname_idx, argv_idx, true);                       \
	}                                                                                     \
	SEC("fentry.s/" TF_SYSCALL_FN(name))                                                  \
	int BPF_PROG(fs_enter_##name, struct pt_regs *regs)                                   \
	{                                                                                     \
		unsigned long a[6];                                                           \
		tf_regs_args(a, regs);                                                        \
		return tf_exec_enter(a, sc, fname_idx, argv_idx, true);                       \
	}                                                                                     \
	SEC("tp/syscalls/sys_exit_" #name)                                                    \
	int tp_exit_##name(struct trace_event_raw_sys_exit *ctx)                              \
	{                                                                                     \
		return tf_exec_exit(ctx->ret);                                                \
	}

TF_EXEC(execve, 3, TF_SC_EXECVE, 0, 1)
TF_EXEC(execveat, 5, TF_SC_EXECVEAT, 1, 2)
