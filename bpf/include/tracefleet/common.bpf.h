/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * tracefleet: maps, settings and helpers shared by every event set's programs.
 *
 * Shared maps (tf_control, tf_stats) are declared identically in every object; the agent
 * creates them once and hands the same fds to each object before load (bpf_map__reuse_fd),
 * so one enable word and one counter table serve all. tf_events is one ring per event set
 * (the agent hands each set's object its own), so a flood in one set cannot fill another's.
 */
#ifndef __TRACEFLEET_COMMON_BPF_H
#define __TRACEFLEET_COMMON_BPF_H

#include "vmlinux.h"
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#include "tracefleet/events.h"

/* hide a value from clang's range analysis, so a check after it stays for the verifier */
#ifndef tf_barrier_var
#define tf_barrier_var(v) asm volatile("" : "+r"(v))
#endif

#ifndef EFAULT
#define EFAULT 14
#endif

/* Load-time settings; the agent writes them into .rodata before load, so the verifier
 * prunes every branch of a strategy this object does not use. */
const volatile struct tf_config tf_cfg = {};

/* kfunc (Linux 6.12+); only referenced by sleepable programs, which load only where the
 * kernel has it. */
extern int bpf_copy_from_user_str(void *dst, __u32 dst__sz, const void *unsafe_ptr__ign,
				  __u64 flags) __weak __ksym;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tf_control);
} tf_control SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 8 << 20);
} tf_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TF_SET_MAX * TF_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} tf_stats SEC(".maps");

/* Workload filters: cgroup id -> bit mask of the sets that trace it. A hash sized by the
 * agent (--cgroup-filter-entries), kept current by it as pods come and go. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u64);
} tf_cgroups SEC(".maps");

/* Followed processes (--pid P --follow): tgid -> bit mask of sets. Seeded by the agent with
 * P and its descendants; follow.bpf.c adds each child forked by a followed process and
 * removes a process when its last thread exits. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u64);
} tf_follow SEC(".maps");

static __always_inline void tf_count(__u32 set, __u32 stat)
{
	__u32 key = set * TF_STAT_MAX + stat;
	__u64 *v = bpf_map_lookup_elem(&tf_stats, &key);

	if (v)
		*v += 1; /* per-CPU slot: no atomics needed */
}

static __always_inline void tf_count_status(__u32 set, __u8 status)
{
	switch (status) {
	case TF_ST_OK:
		tf_count(set, TF_STAT_ARG_OK);
		break;
	case TF_ST_RECOVERED:
		tf_count(set, TF_STAT_ARG_RECOVERED);
		break;
	case TF_ST_LOST:
		tf_count(set, TF_STAT_ARG_LOST);
		break;
	case TF_ST_TRUNCATED:
		tf_count(set, TF_STAT_ARG_TRUNCATED);
		break;
	case TF_ST_TORN:
		tf_count(set, TF_STAT_ARG_TORN);
		break;
	case TF_ST_MISMATCH:
		tf_count(set, TF_STAT_ARG_MISMATCH);
		break;
	case TF_ST_REREAD:
		tf_count(set, TF_STAT_ARG_REREAD);
		break;
	}
}

/*
 * The calling task's comm as two 64-bit words, zero after its NUL (as bpf_get_current_comm
 * pads it), read with two direct BTF loads instead of that helper: it ran twice per traced
 * call (the comm filter, the header), ~60 ns each on the bench VM. The bytes after the NUL
 * are cleared here because kernels before strscpy_pad in __set_task_comm may leave a longer
 * old name's tail there. A concurrent rename can tear the read, as it can the helper's copy.
 */
static __always_inline void tf_current_comm(__u64 comm[2])
{
	struct task_struct *task = bpf_get_current_task_btf();
	const __u64 *w = (const __u64 *)task->comm;
	__u64 w0 = w[0], w1 = w[1], z0, z1;

	/* per word: the high bit of each zero byte (exact up to the first one), its lowest
	 * set bit minus one keeps the bytes before it; no zero byte: all of them */
	z0 = (w0 - 0x0101010101010101ULL) & ~w0 & 0x8080808080808080ULL;
	z1 = (w1 - 0x0101010101010101ULL) & ~w1 & 0x8080808080808080ULL;
	comm[0] = w0 & ((z0 & -z0) - 1);
	comm[1] = z0 ? 0 : w1 & ((z1 & -z1) - 1);
}

/*
 * Is the task's comm one of the filter's? Compared as two 64-bit words: both sides are
 * zero-padded after their NUL (tf_current_comm pads, the agent writes each filter comm into
 * a zeroed slot), so word equality is string equality. A byte loop with an early return per
 * byte made the verifier walk ~48,000 instructions in every entry program (about 100 ms of
 * load time each, most of capture's start-up); this is a few dozen.
 */
_Static_assert(TF_COMM_LEN == 16, "tf_comm_match compares two words");
_Static_assert(__builtin_offsetof(struct tf_control, filter) % 8 == 0 &&
		       __builtin_offsetof(struct tf_filter, comms) % 8 == 0 &&
		       sizeof(struct tf_filter) % 8 == 0,
	       "filter comms are 8-byte aligned in the map value");

static __always_inline bool tf_comm_match(const struct tf_filter *f)
{
	__u64 comm[TF_COMM_LEN / 8];
	bool hit = false;

	tf_current_comm(comm);
	for (int i = 0; i < TF_FILTER_COMMS; i++) {
		const __u64 *want = (const __u64 *)f->comms[i];

		if (i < f->ncomms && want[0] == comm[0] && want[1] == comm[1])
			hit = true;
	}
	return hit;
}

/* The task's cgroup v2 id as bpf_get_current_cgroup_id gives it (its default hierarchy's
 * cgroup, kernfs node id), by direct loads: one helper call less per record. */
static __always_inline __u64 tf_current_cgroup_id(void)
{
	struct task_struct *task = bpf_get_current_task_btf();

	return task->cgroups->dfl_cgrp->kn->id;
}

/*
 * The first thing every entry program does: is this set enabled, and does the calling task
 * pass the set's filters? Returns the control entry, or NULL to skip the syscall.
 */
static __always_inline struct tf_control *tf_should_trace(__u32 set, __u32 tgid)
{
	__u32 zero = 0;
	struct tf_control *ctl = bpf_map_lookup_elem(&tf_control, &zero);

	if (!ctl || !(ctl->enabled_bits & (1ULL << set)))
		return NULL;
	if (tgid == tf_cfg.agent_tgid)
		return NULL;
	if (set >= TF_SET_MAX)
		return NULL;

	struct tf_filter *f = &ctl->filter[set];
	if (f->npids || f->follow) {
		bool hit = false;
		for (int i = 0; i < TF_FILTER_PIDS; i++)
			if (i < f->npids && f->pids[i] == tgid)
				hit = true;
		if (!hit && f->follow) {
			__u64 *sets = bpf_map_lookup_elem(&tf_follow, &tgid);

			hit = sets && (*sets & (1ULL << set));
		}
		if (!hit)
			goto filtered;
	}
	if (f->ncomms && !tf_comm_match(f))
		goto filtered;
	if (f->cgroup_filter) {
		__u64 cg = tf_current_cgroup_id();
		__u64 *sets = bpf_map_lookup_elem(&tf_cgroups, &cg);

		if (!sets || !(*sets & (1ULL << set)))
			goto filtered;
	}
	return ctl;
filtered:
	tf_count(set, TF_STAT_FILTERED);
	return NULL;
}

/* Path-prefix filter, applied once the path is captured. */
static __always_inline bool tf_prefix_ok(__u32 set, const struct tf_str *s)
{
	__u32 zero = 0;
	struct tf_control *ctl = bpf_map_lookup_elem(&tf_control, &zero);

	if (!ctl || set >= TF_SET_MAX)
		return true;
	struct tf_filter *f = &ctl->filter[set];
	if (!f->prefix_len)
		return true;
	if (s->status != TF_ST_OK && s->status != TF_ST_RECOVERED && s->status != TF_ST_TRUNCATED)
		return true; /* unknown path: keep the event rather than hide a failure */
	for (int i = 0; i < TF_PREFIX_MAX; i++) {
		if (i >= f->prefix_len)
			return true;
		/* bytes past the length are not cleared (records carry only len bytes) */
		if (i >= s->len || s->data[i] != f->prefix[i])
			return false;
	}
	return true;
}

/* ppid, uid, gid: what users expect next to pid and comm */
static __always_inline void tf_fill_ctx(struct tf_hdr *h)
{
	/* direct BTF loads, not helper calls: this runs for every record. The real ids as
	 * bpf_get_current_uid_gid gives them (it maps through init_user_ns: the identity). */
	struct task_struct *task = bpf_get_current_task_btf();
	const struct cred *cred = task->cred;

	h->ppid = task->real_parent->tgid;
	h->uid = cred->uid.val;
	h->gid = cred->gid.val;
	h->ctx_ok = 1;
}

static __always_inline void tf_fill_hdr(struct tf_hdr *h, __u16 kind, __u32 set, __u16 sc)
{
	__u64 id = bpf_get_current_pid_tgid();

	h->ts_ns = bpf_ktime_get_ns();
	h->pid = id >> 32;
	h->tid = (__u32)id;
	h->kind = kind;
	h->syscall = sc;
	h->event_set = set;
	h->strategy = tf_cfg.strategy;
	h->cgroup_id = tf_current_cgroup_id();
	_Static_assert(__builtin_offsetof(struct tf_hdr, comm) % 8 == 0, "comm words aligned");
	tf_current_comm((__u64 *)h->comm);
	tf_fill_ctx(h);
}

/* Record a string read result of `n` (helper return: bytes incl. NUL, or -errno). */
static __always_inline void tf_str_result(struct tf_str *s, long n, __u8 ok_status,
					  __u8 strategy)
{
	s->strategy = strategy;
	if (n < 0) {
		s->err = n;
		s->len = 0;
		s->status = tf_cfg.strategy == TF_STRAT_EXIT_RETRY ? TF_ST_PENDING : TF_ST_LOST;
		return;
	}
	s->err = 0;
	s->len = n > 0 ? n - 1 : 0;
	s->status = ok_status;
	if (n >= TF_PATH_MAX) {
		/* The helper stops at the buffer's end: was there more? */
		char next = 0;

		bpf_probe_read_user(&next, 1, (void *)(s->uptr + TF_PATH_MAX - 1));
		if (next)
			s->status = TF_ST_TRUNCATED;
	}
}

/*
 * Copy n bytes of kernel memory the program owns (map values, its stack) in 8-byte words,
 * not with a bpf_probe_read_kernel call (~25 ns on the bench VM; a word is one load and one
 * store). Whole words: up to 7 bytes past n are copied too, so both sides must have room
 * for ceil(n / 8) words, and n must be at most 8 * max_words.
 */
static __always_inline void tf_copy_words(void *dst, const void *src, __u32 n, const int max_words)
{
	/* the loop bounds a word count, not n: a bound learnt on n itself would follow each of
	 * the loop's exits through the rest of the program, one verifier state each */
	__u32 words = (n + 7) >> 3;

	for (int i = 0; i < max_words; i++) {
		if (i >= words)
			break;
		((__u64 *)dst)[i] = ((const __u64 *)src)[i];
	}
}

/*
 * bpf_probe_read_user_str into dst (TF_PATH_MAX bytes). With hardened usercopy the kernel
 * checks the destination of every user copy, and a slab object (a task-storage slot) is its
 * dearest case (virt_addr_valid, the slab's bounds: ~90 ns per call on the bench VM's
 * openat loop, a tenth of the file set's cost); the program's stack costs less. So a
 * string that fits TF_STR_STACK bytes (most paths) is read onto the stack and copied in
 * 8-byte words; a longer one is read again, straight into place.
 */
#define TF_STR_STACK 128
_Static_assert(TF_STR_STACK <= TF_PATH_MAX && TF_STR_STACK % 8 == 0, "stack read fits a string");
static __always_inline long tf_probe_user_str(char *dst, unsigned long uptr)
{
	__u64 buf[TF_STR_STACK / 8] = {};
	long n = bpf_probe_read_user_str(buf, sizeof(buf), (void *)uptr);

	if (n < 0)
		return n;
	if (n < (long)sizeof(buf)) { /* its NUL fitted: the whole string is here */
		tf_copy_words(dst, buf, sizeof(buf), TF_STR_STACK / 8);
		return n;
	}
	return bpf_probe_read_user_str(dst, TF_PATH_MAX, (void *)uptr);
}

/* Read a user string at syscall entry with this object's strategy. */
static __always_inline void tf_read_str_entry(struct tf_str *s, unsigned long uptr, bool sleepable)
{
	long n;

	s->uptr = uptr;
	if (!uptr) {
		s->status = TF_ST_NONE;
		return;
	}
	if (sleepable)
		n = bpf_copy_from_user_str(s->data, sizeof(s->data), (void *)uptr, 0);
	else
		n = tf_probe_user_str(s->data, uptr);
	tf_str_result(s, n, TF_ST_OK, tf_cfg.strategy);
}

/* Exit retry: the syscall has run, so the kernel has faulted in what it read. */
static __always_inline void tf_retry_str(struct tf_str *s)
{
	if (s->status != TF_ST_PENDING)
		return;
	long n = tf_probe_user_str(s->data, s->uptr);

	if (n < 0) {
		s->err = n;
		s->status = TF_ST_LOST;
		s->strategy = TF_STRAT_EXIT_RETRY;
		return;
	}
	tf_str_result(s, n, TF_ST_RECOVERED, TF_STRAT_EXIT_RETRY);
}

static __always_inline __u32 tf_blob_len(unsigned long len)
{
	if (len > TF_BLOB_MAX)
		len = TF_BLOB_MAX;
	return len;
}

static __always_inline void tf_read_blob(struct tf_blob *b, unsigned long uptr, unsigned long len,
					 bool sleepable, __u8 ok_status, __u8 strategy)
{
	long r;
	__u32 n = tf_blob_len(len);

	b->uptr = uptr;
	if (!uptr || !n) {
		b->status = TF_ST_NONE;
		return;
	}
	if (sleepable)
		r = bpf_copy_from_user(b->data, n & (2 * TF_BLOB_MAX - 1), (void *)uptr);
	else
		r = bpf_probe_read_user(b->data, n & (2 * TF_BLOB_MAX - 1), (void *)uptr);
	b->strategy = strategy;
	if (r < 0) {
		b->err = r;
		b->status = (ok_status == TF_ST_OK && tf_cfg.strategy == TF_STRAT_EXIT_RETRY)
				    ? TF_ST_PENDING
				    : TF_ST_LOST;
		return;
	}
	b->err = 0;
	b->len = n;
	b->status = len > TF_BLOB_MAX ? TF_ST_TRUNCATED : ok_status;
}

/*
 * Writing a record (events.h: header, fixed part, length-prefixed strings) straight into the
 * ring: bpf_ringbuf_reserve_dynptr takes the computed size, and each part is copied once, from
 * the program's working state, with bpf_dynptr_write. (The alternative, building the record
 * in a per-CPU scratch buffer and handing it to bpf_ringbuf_output, copies every byte twice;
 * build with -DTF_REC_VIA_OUTPUT to compare on the bench loop.)
 *
 * The consumer is woken only in batches: once, when the unread data crosses wakeup_bytes (not
 * on every record above it, which would be a wakeup per event whenever the consumer lags).
 * The agent's poll timer collects the rest.
 */
struct tf_rec {
#ifdef TF_REC_VIA_OUTPUT
	char *buf;
#else
	struct bpf_dynptr ptr;
#endif
	__u32 off;
	__u32 size;
};

#ifdef TF_REC_VIA_OUTPUT
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, char[2 * TF_REC_MAX]);
} tf_rec_buf SEC(".maps");
#endif

static __always_inline bool tf_rec_begin(struct tf_rec *r, __u32 set, __u32 size)
{
	r->off = 0;
	r->size = size;
#ifdef TF_REC_VIA_OUTPUT
	__u32 zero = 0;

	r->buf = bpf_map_lookup_elem(&tf_rec_buf, &zero);
	return r->buf != NULL;
#else
	if (bpf_ringbuf_reserve_dynptr(&tf_events, size, 0, &r->ptr)) {
		bpf_ringbuf_discard_dynptr(&r->ptr, 0);
		tf_count(set, TF_STAT_DROPPED);
		return false;
	}
	return true;
#endif
}

/* Append n bytes (n bounded by the caller: at most TF_REC_MAX / 2). */
static __always_inline void tf_rec_put(struct tf_rec *r, const void *src, __u64 n)
{
#ifdef TF_REC_VIA_OUTPUT
	__u32 off = r->off;

	tf_barrier_var(n);
	if (n > TF_REC_MAX / 2)
		return;
	bpf_probe_read_kernel(&r->buf[off & (TF_REC_MAX - 1)], n, src);
#else
	bpf_dynptr_write(&r->ptr, r->off, (void *)src, n, 0);
#endif
	r->off += n;
}

static __always_inline __u64 tf_wake_flags(__u32 size)
{
	__u64 avail = bpf_ringbuf_query(&tf_events, BPF_RB_AVAIL_DATA);

	if (avail < tf_cfg.wakeup_bytes && avail + size >= tf_cfg.wakeup_bytes)
		return BPF_RB_FORCE_WAKEUP;
	return BPF_RB_NO_WAKEUP;
}

/* A record already whole and contiguous in the program's state (size bounded by the
 * caller to that state): one bpf_ringbuf_output instead of a dynptr's reserve, write and
 * submit (three helper calls, ~35 ns on the bench VM). */
static __always_inline void tf_rec_output(__u32 set, const void *src, __u64 size)
{
	if (bpf_ringbuf_output(&tf_events, (void *)src, size, tf_wake_flags(size))) {
		tf_count(set, TF_STAT_DROPPED);
		return;
	}
	tf_count(set, TF_STAT_EVENTS);
}

static __always_inline void tf_rec_end(struct tf_rec *r, __u32 set)
{
	__u64 flags = tf_wake_flags(r->size);
#ifdef TF_REC_VIA_OUTPUT
	__u32 size = r->size;

	tf_barrier_var(size);
	if (size > TF_REC_MAX || bpf_ringbuf_output(&tf_events, r->buf, size, flags)) {
		tf_count(set, TF_STAT_DROPPED);
		return;
	}
#else
	bpf_ringbuf_submit_dynptr(&r->ptr, flags);
#endif
	tf_count(set, TF_STAT_EVENTS);
}

/* A string's length as it goes out: never past its buffer (the record's lengths must add up
 * to its size, so a clamp is written back into the string's head too). */
static __always_inline __u32 tf_str_out_len(struct tf_str *s)
{
	if (s->len > TF_PATH_MAX - 1)
		s->len = TF_PATH_MAX - 1;
	return s->len;
}

static __always_inline __u32 tf_blob_out_len(struct tf_blob *b)
{
	if (b->len > TF_BLOB_MAX)
		b->len = TF_BLOB_MAX;
	return b->len;
}

/* A string (struct tf_str or tf_blob): its head, then its len bytes (len <= max, the size
 * of its data: checked already, again here for the verifier). */
static __always_inline void tf_rec_str(struct tf_rec *r, const void *s, __u64 len, __u64 max)
{
	tf_barrier_var(len);
	if (len > max)
		len = max;
	tf_rec_put(r, s, TF_STRH_SIZE + len);
}

/* The fixed part of a record (`fixed` bytes from start: the offset of the string field that
 * follows it) and that string, in one write: one helper call less per record. */
_Static_assert(__builtin_offsetof(struct tf_str, data) == TF_STRH_SIZE &&
		       __builtin_offsetof(struct tf_blob, data) == TF_STRH_SIZE,
	       "a string's head and its bytes are contiguous");
static __always_inline void tf_rec_fixed_str(struct tf_rec *r, const void *start, __u64 fixed,
					     __u64 len, __u64 max)
{
	tf_barrier_var(len);
	if (len > max)
		len = max;
	tf_rec_put(r, start, fixed + TF_STRH_SIZE + len);
}

/*
 * Take the calling thread's slot in a per-thread in-flight hash. A slot still taken means a
 * call of this tid never exited (the thread died inside it and its tid was reused before
 * the agent reaped it): that call is lost, and counted. A full map refuses, counted.
 */
static __always_inline bool tf_inflight_insert(void *map, __u32 *tid, void *tmpl, __u32 set)
{
	long err = bpf_map_update_elem(map, tid, tmpl, BPF_NOEXIST);

	if (err == -17 /* EEXIST */) {
		tf_count(set, TF_STAT_INFLIGHT_STALE);
		err = bpf_map_update_elem(map, tid, tmpl, BPF_EXIST);
	}
	if (err) {
		tf_count(set, TF_STAT_INFLIGHT_FULL);
		return false;
	}
	return true;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#endif /* __TRACEFLEET_COMMON_BPF_H */
