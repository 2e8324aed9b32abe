/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * tracefleet: entry/exit pairs that build one struct tf_event per syscall.
 *
 * TF_SYSCALL(name, nargs, ...) defines, for one syscall, every program variant the capture ladder
 * can pick from; the agent enables (autoload) only the variants of the chosen strategy:
 *   tp_enter_<name>   tracepoint, non-sleepable read       (exit-retry, nofault)
 *   tps_enter_<name>  tracepoint, sleepable copy           (sleepable; BPF_F_SLEEPABLE set by the agent)
 *   fs_enter_<name>   fentry.s on the syscall function      (fentry-sleepable)
 *   tp_exit_<name>    tracepoint at exit: return value, retry, emit (every strategy)
 *   tp_thread_exit    sched_process_exit: a thread dying mid-call (every strategy)
 * The per-thread record lives in task-local storage (tf_slots) between entry and exit: one
 * slot per thread, created at its first traced call and freed with the thread, so no process
 * can fill it by parking threads in syscalls (a tid-keyed hash, as before, had a size to
 * fill and cost ~8.5% of a traced openat+close loop in insert/delete and copying a zeroed
 * template). A slot is taken under the set's attachment epoch (tf_control.epoch, changed
 * by the agent at each detach): a slot of an older epoch is free (its call was counted by
 * the agent at that detach). tf_inflight_n counts the calls in flight (+1 taken, -1
 * completed or lost); every call that passed is written, dropped, filtered, counted lost
 * (INFLIGHT_FULL: no slot; INFLIGHT_STALE: exit never ran), or in that count.
 */
#ifndef __TRACEFLEET_SYSCALL_EVENT_BPF_H
#define __TRACEFLEET_SYSCALL_EVENT_BPF_H

#include "tracefleet/common.bpf.h"
#include "tracefleet/args.bpf.h"
/* fd -> file -> path, for checking what the open family opened; the rest is unused here */
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wunused-function"
#include "tracefleet/vfs_path.bpf.h"
#include "tracefleet/exe.bpf.h"
#pragma clang diagnostic pop

#define TF_NOARG (-1)

struct tf_slot {
	__u32 epoch; /* tf_control.epoch of the attachment whose call holds it; 0: free */
	__u32 _pad;
	struct tf_event rec;
};

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct tf_slot);
} tf_slots SEC(".maps");

/* Calls in flight, per CPU (a call may exit on another CPU): the agent sums them. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __s64);
} tf_inflight_n SEC(".maps");

static __always_inline void tf_inflight_add(__s64 d)
{
	__u32 zero = 0;
	__s64 *n = bpf_map_lookup_elem(&tf_inflight_n, &zero);

	if (n)
		*n += d;
}

static __always_inline __u32 tf_epoch(const struct tf_control *ctl, __u32 set)
{
	return ctl->epoch[set & (TF_SET_MAX - 1)];
}

/* The calling thread's slot with a call of the current attachment in it, or NULL. */
static __always_inline struct tf_slot *tf_slot_taken(__u32 set)
{
	__u32 zero = 0;
	struct tf_control *ctl = bpf_map_lookup_elem(&tf_control, &zero);
	struct tf_slot *s = bpf_task_storage_get(&tf_slots, bpf_get_current_task_btf(), 0, 0);

	if (!ctl || !s || !s->epoch || s->epoch != tf_epoch(ctl, set))
		return NULL;
	return s;
}

static __always_inline void tf_slot_release(struct tf_slot *s)
{
	s->epoch = 0;
	tf_inflight_add(-1);
}

/*
 * s0, s1: indexes of string arguments; blob/blob_len: index of a struct argument and of its
 * length; blob_out: the struct is written by the kernel (accept4), read at exit with its
 * length behind the pointer in blob_len.
 */
static __always_inline int tf_sys_enter(const unsigned long *a, __u32 set, __u16 sc, int s0,
					int s1, int blob, int blob_len, bool blob_out,
					bool sleepable)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct tf_control *ctl = tf_should_trace(set, id >> 32);
	struct tf_slot *slot;
	struct tf_event *e;
	__u32 epoch;

	if (!ctl)
		return 0;
	tf_count(set, TF_STAT_PASSED);
	slot = bpf_task_storage_get(&tf_slots, bpf_get_current_task_btf(), 0,
				    BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!slot) {
		tf_count(set, TF_STAT_INFLIGHT_FULL); /* no memory, or storage busy on this CPU */
		return 0;
	}
	epoch = tf_epoch(ctl, set);
	if (slot->epoch && slot->epoch == epoch)
		tf_count(set, TF_STAT_INFLIGHT_STALE); /* its last call's exit never ran */
	else
		tf_inflight_add(1);
	slot->epoch = epoch;
	e = &slot->rec;
	/* Only what a record carries from here needs resetting: the header and the strings'
	 * heads (iargs are all written below; a string goes out with only its len bytes). */
	__builtin_memset(&e->hdr, 0, sizeof(e->hdr));
	__builtin_memset(&e->str[0], 0, TF_STRH_SIZE);
	__builtin_memset(&e->str[1], 0, TF_STRH_SIZE);
	__builtin_memset(&e->blob, 0, TF_STRH_SIZE);
	tf_fill_hdr(&e->hdr, TF_KIND_SYSCALL, set, sc);
	for (int i = 0; i < 6; i++)
		e->iargs[i] = a[i];
	if (s0 >= 0)
		tf_read_str_entry(&e->str[0], a[s0], sleepable);
	if (s1 >= 0)
		tf_read_str_entry(&e->str[1], a[s1], sleepable);
	if (blob >= 0 && !blob_out)
		tf_read_blob(&e->blob, a[blob], a[blob_len], sleepable, TF_ST_OK, tf_cfg.strategy);
	return 0;
}

static __always_inline bool tf_open_family(__u16 sc)
{
	return sc == TF_SC_OPENAT || sc == TF_SC_OPENAT2 || sc == TF_SC_CREAT || sc == TF_SC_OPEN;
}

/*
 * Is `name` (n bytes) the last component of path p? 1 yes, 0 no, -1 no verdict (the last
 * component is "." or "..", which name a directory by another name).
 */
static __always_inline int tf_last_is(const struct tf_str *p, const char *name, long n)
{
	__u32 end = p->len, start;

	for (int i = 0; i < 8 && end > 1 && p->data[(end - 1) & (TF_PATH_MAX - 1)] == '/'; i++)
		end--; /* "dir/" names dir */
	if (end && p->data[(end - 1) & (TF_PATH_MAX - 1)] == '.') {
		char b1 = end > 1 ? p->data[(end - 2) & (TF_PATH_MAX - 1)] : '/';
		char b2 = end > 2 ? p->data[(end - 3) & (TF_PATH_MAX - 1)] : '/';

		if (b1 == '/' || (b1 == '.' && b2 == '/'))
			return -1;
	}
	if (n <= 0 || n > end)
		return 0;
	start = end - n;
	if (start > 0 && p->data[(start - 1) & (TF_PATH_MAX - 1)] != '/')
		return 0;
	for (int i = 0; i < TF_NAME_MAX; i++) {
		if (i >= n)
			break;
		if (p->data[(start + i) & (TF_PATH_MAX - 1)] != name[i & (TF_NAME_MAX - 1)])
			return 0;
	}
	return 1;
}

/*
 * Open family, call succeeded: the fd it returned names the file the kernel opened. Its path
 * goes into str[1] whenever the captured name was not read at entry (re-read or lost), and a
 * re-read name whose last component is not that file's name is marked TF_ST_MISMATCH: a
 * sibling thread may have rewritten the buffer while the call ran.
 */
static __always_inline void tf_check_open(struct tf_event *e, long fd)
{
	struct tf_vfs_scratch *s = tf_scratch();
	struct file *f = tf_fd_file(fd);
	struct dentry *d, *parent;
	bool torn = false;
	long n;

	if (!s || !f)
		return;
	d = tf_file_dentry(f);
	tf_walk_path(&e->str[1], d, tf_file_mnt(f));
	if (e->str[0].status != TF_ST_RECOVERED)
		return;
	n = tf_dentry_name(s, d, &parent, &torn);
	if (n > 0 && !torn && tf_last_is(&e->str[0], s->name, n) == 0)
		e->str[0].status = TF_ST_MISMATCH;
}

/*
 * The record: hdr and iargs, then str[0], str[1] and blob, each only as long as its data.
 * Most calls have no second string (and many no blob): their heads are then copied into the
 * slot right after str[0]'s bytes, which no longer matter, so the record goes out whole with
 * one bpf_ringbuf_output (in two dynptr writes with a blob) instead of three writes.
 */
static __always_inline void tf_emit_syscall(__u32 set, struct tf_event *e)
{
	__u32 l0 = tf_str_out_len(&e->str[0]), l1 = tf_str_out_len(&e->str[1]);
	__u32 lb = tf_blob_out_len(&e->blob);
	__u64 fixed = offsetof(struct tf_event, str) + TF_STRH_SIZE;
	struct tf_rec r;

	/* (each outcome written once, not tested again below: every branch here is one more
	 * path for the verifier to walk in every exit program) */
	if (l1 == 0 && l0 <= TF_PATH_MAX - 2 * TF_STRH_SIZE) {
		char *tail = &e->str[0].data[l0 & (TF_PATH_MAX - 1)];

		/* (tail may be unaligned: word stores are fine there) */
		tf_copy_words(tail, &e->str[1], TF_STRH_SIZE, TF_STRH_SIZE / 8);
		if (lb == 0) {
			tf_copy_words(tail + TF_STRH_SIZE, &e->blob, TF_STRH_SIZE, TF_STRH_SIZE / 8);
			tf_rec_output(set, e, fixed + (l0 & (TF_PATH_MAX - 1)) + 2 * TF_STRH_SIZE);
			return;
		}
		if (!tf_rec_begin(&r, set, fixed + l0 + 2 * TF_STRH_SIZE + lb))
			return;
		tf_rec_put(&r, e, fixed + l0 + TF_STRH_SIZE);
		tf_rec_str(&r, &e->blob, lb, TF_BLOB_MAX);
		tf_rec_end(&r, set);
		return;
	}
	if (!tf_rec_begin(&r, set, fixed + 2 * TF_STRH_SIZE + l0 + l1 + lb))
		return;
	tf_rec_fixed_str(&r, e, offsetof(struct tf_event, str), l0, TF_PATH_MAX - 1);
	tf_rec_str(&r, &e->str[1], l1, TF_PATH_MAX - 1);
	tf_rec_str(&r, &e->blob, lb, TF_BLOB_MAX);
	tf_rec_end(&r, set);
}

static __always_inline int tf_sys_exit(long ret, __u32 set, __u16 sc, int blob, int blob_len,
				       bool blob_out)
{
	struct tf_slot *slot = tf_slot_taken(set);
	struct tf_event *e;

	if (!slot)
		return 0;
	e = &slot->rec;
	e->hdr.ret = ret;
	e->hdr.exit_ns = bpf_ktime_get_ns();
	if (tf_cfg.strategy == TF_STRAT_EXIT_RETRY) {
		tf_retry_str(&e->str[0]);
		tf_retry_str(&e->str[1]);
		if (e->blob.status == TF_ST_PENDING)
			tf_read_blob(&e->blob, e->blob.uptr, e->iargs[blob_len & 7], false,
				     TF_ST_REREAD, TF_STRAT_EXIT_RETRY);
	}
	if (tf_open_family(sc) && ret >= 0 && e->str[0].status != TF_ST_OK &&
	    e->str[0].status != TF_ST_TRUNCATED)
		tf_check_open(e, ret);
	if (blob >= 0 && blob_out && ret >= 0) {
		/* accept4: the kernel wrote the peer address and its length */
		int len = 0;
		unsigned long addr = e->iargs[blob & 7];
		unsigned long lenp = e->iargs[blob_len & 7];

		if (addr && lenp && !bpf_probe_read_user(&len, sizeof(len), (void *)lenp))
			tf_read_blob(&e->blob, addr, len < 0 ? 0 : len, false, TF_ST_OK,
				     tf_cfg.strategy);
	}
	if (!tf_prefix_ok(set, &e->str[0])) {
		tf_count(set, TF_STAT_FILTERED);
		tf_count(set, TF_STAT_PREFIX_FILTERED);
		tf_slot_release(slot);
		return 0;
	}
	for (int i = 0; i < TF_NSTR; i++)
		tf_count_status(set, e->str[i].status);
	tf_count_status(set, e->blob.status);
	tf_fill_exe(&e->hdr, set); /* here, not at a (maybe sleepable) entry: exe.bpf.h */
	tf_emit_syscall(set, e);
	tf_slot_release(slot);
	return 0;
}

#define TF_SYSCALL(name, nargs, set, sc, s0, s1, blob, blob_len, blob_out)                          \
	SEC("tp/syscalls/sys_enter_" #name)                                                   \
	int tp_enter_##name(struct trace_event_raw_sys_enter *ctx)                            \
	{                                                                                     \
		unsigned long a[6];                                                           \
		tf_tp_args(a, ctx, nargs);                                                           \
		return tf_sys_enter(a, set, sc, s0, s1, blob, blob_len, blob_out, false);     \
	}                                                                                     \
	SEC("tp/syscalls/sys_enter_" #name)                                                   \
	int tps_enter_##name(struct trace_event_raw_sys_enter *ctx)                           \
	{                                                                                     \
		unsigned long a[6];                                                           \
		tf_tp_args(a, ctx, nargs);                                                           \
		return tf_sys_enter(a, set, sc, s0, s1, blob, blob_len, blob_out, true);      \
	}                                                                                     \
	SEC("fentry.s/" TF_SYSCALL_FN(name))                                                  \
	int BPF_PROG(fs_enter_##name, struct pt_regs *regs)                                   \
	{                                                                                     \
		unsigned long a[6];                                                           \
		tf_regs_args(a, regs);                                                        \
		return tf_sys_enter(a, set, sc, s0, s1, blob, blob_len, blob_out, true);      \
	}                                                                                     \
	SEC("tp/syscalls/sys_exit_" #name)                                                    \
	int tp_exit_##name(struct trace_event_raw_sys_exit *ctx)                              \
	{                                                                                     \
		return tf_sys_exit(ctx->ret, set, sc, blob, blob_len, blob_out);                  \
	}

/* A thread that exits holding a slot of this attachment (killed mid-call, or its exit
 * skipped): the call is lost, counted. A classic tracepoint: fentry/tp_btf need BTF
 * attach permissions some hosts refuse. Fires once per thread (do_exit). */
#define TF_THREAD_EXIT(set)                                                                 \
	SEC("tp/sched/sched_process_exit")                                                  \
	int tp_thread_exit(void *ctx)                                                       \
	{                                                                                   \
		struct tf_slot *slot = tf_slot_taken(set);                                  \
		if (slot) {                                                                 \
			tf_count(set, TF_STAT_INFLIGHT_STALE);                              \
			tf_slot_release(slot);                                              \
		}                                                                           \
		return 0;                                                                   \
	}

#endif /* __TRACEFLEET_SYSCALL_EVENT_BPF_H */
