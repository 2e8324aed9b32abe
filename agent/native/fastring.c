// SPDX-License-Identifier: Apache-2.0
/*
 * tracefleet compiled ring-buffer consumer (loaded with ctypes by
 * tracefleet/agent/capture/fastring.py).
 *
 * Owns the libbpf ring_buffer poll loop. Per record, in C: the aggregates the agent keeps
 * from the header (records per set and syscall, the delivery-latency histogram); a record is
 * copied into a batch for Python only when something needs it decoded (a sink, a sample,
 * a lost argument for the user-space fallback, a header this code does not know). Python
 * drains the batch once per poll: no Python call per record.
 *
 * No layout is defined here: the header offsets, the histogram bounds and the offsets of
 * argument status bytes come from Python (abi.py, engine.py) at init, so the ABI and the
 * buckets have one definition each. Only struct tf_hdr fields and the sample size are read
 * (records may be variable-length).
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <bpf/libbpf.h>

#include "jsonfmt.h"
#include "rdbytes.h"
#include "walk.h"

#define TF_FAST_ABI 4
#define MAX_BOUNDS 64
#define MAX_KINDS 8
#define MAX_HEADS 8

/* per-set flags */
#define SET_DELIVER 1u  /* every record: a sink reads the events */
#define SET_SAMPLE 2u   /* sample_threshold: share of records sampled, of 2^32 */
#define SET_FALLBACK 4u /* records with a lost argument go to the user-space fallback */
#define SET_SAMPLE_ALL 8u /* sample rate >= 1 */
#define SET_JSONL 16u /* the only reader is the jsonl output: the formatter writes the line */

/* per batch entry flags (REC_SAMPLE, REC_FALLBACK, REC_RAW) and the entry: walk.h */

struct tf_fast_params {
	uint32_t abi;
	uint32_t hdr_size;
	uint32_t off_ts, off_kind, off_syscall, off_set;
	uint32_t nsets, nsyscalls;
	uint32_t nbounds;
	uint32_t lost_status;
	uint32_t batch_bytes;
	uint32_t reserve_bytes; /* stop filling the batch when less than this is left */
	double bounds[MAX_BOUNDS];
	/* records are variable-length: a kind's argument statuses are found by walking its
	 * string heads (each strh_size bytes, then its len bytes of data) */
	uint32_t strh_size, strh_len_off, strh_status_off;
	uint32_t lost_start[MAX_KINDS]; /* offset of the first string head; 0: none */
	uint32_t lost_heads[MAX_KINDS]; /* string heads in a row */
	uint32_t lost_argv[MAX_KINDS];  /* 1: an argv head (status at strh_status_off) follows */
};

struct set_agg {
	uint64_t delivered;
	double sum;
	uint64_t *hist;    /* nbounds + 1 */
	uint64_t *by_sc;   /* nsyscalls */
	uint32_t *touched; /* syscalls counted since the last take */
	uint32_t ntouched;
};

struct tf_fast {
	struct tf_fast_params p;
	struct ring_buffer *rb;
	int aborted; /* tf_fast_abort from another thread: atomic */
	uint64_t records;   /* every record seen */
	uint64_t forwarded; /* copied into the batch */
	uint64_t short_records;
	uint64_t nomem;
	uint64_t rng;
	uint32_t *set_flags;
	uint32_t *sample_thr;
	struct set_agg *agg;
	uint8_t *batch;
	size_t batch_len, batch_cap;
	int full;
	struct tf_jfmt *jf; /* the compiled jsonl formatter (jsonfmt.c), or NULL */
	uint64_t jsonl_c, jsonl_py; /* lines of SET_JSONL sets: made in C, left to Python */
};

void tf_fast_free(struct tf_fast *f);

static inline uint64_t mono_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline uint32_t rand32(struct tf_fast *f)
{
	uint64_t x = f->rng; /* xorshift64* */
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	f->rng = x;
	return (uint32_t)((x * 0x2545F4914F6CDD1Dull) >> 32);
}

static int has_lost_arg(const struct tf_fast *f, const uint8_t *d, size_t size, uint16_t kind)
{
	const struct tf_fast_params *p = &f->p;

	if (kind >= MAX_KINDS || !p->lost_start[kind])
		return 0;
	size_t off = p->lost_start[kind];
	for (uint32_t i = 0; i < p->lost_heads[kind] && i < MAX_HEADS; i++) {
		if (off + p->strh_size > size) /* malformed: decoding it reports it */
			return 0;
		if (d[off + p->strh_status_off] == p->lost_status)
			return 1;
		off += p->strh_size + u16_at(d + off + p->strh_len_off);
	}
	return p->lost_argv[kind] && off + p->strh_status_off < size &&
	       d[off + p->strh_status_off] == p->lost_status;
}

static int forward(struct tf_fast *f, const uint8_t *d, size_t size, uint32_t flags,
		   uint64_t now)
{
	size_t need = sizeof(struct entry_hdr) + ((size + 7) & ~(size_t)7);
	if (f->batch_len + need > f->batch_cap) {
		/* a record larger than the reserve: grow (Python re-reads the pointer per drain) */
		size_t cap = f->batch_cap * 2;
		while (cap < f->batch_len + need)
			cap *= 2;
		uint8_t *nb = realloc(f->batch, cap);
		if (!nb) {
			f->nomem++; /* the record is consumed: Python counts it as an error */
			return 0;
		}
		f->batch = nb;
		f->batch_cap = cap;
	}
	struct entry_hdr *e = (struct entry_hdr *)(f->batch + f->batch_len);
	e->size = (uint32_t)size;
	e->flags = flags;
	e->recv_ns = now;
	memcpy(e + 1, d, size);
	f->batch_len += need;
	f->forwarded++;
	if (f->batch_cap - f->batch_len < f->p.reserve_bytes) {
		f->full = 1;
		return -ENOSPC; /* stop this poll: Python drains, then consumes again */
	}
	return 0;
}

/* aggregate-only: what consumer.py's on_record counts, bucketed like Histogram.observe */
static void count_record(struct tf_fast *f, const uint8_t *d, uint32_t set, uint32_t sc,
			 uint64_t now)
{
	struct set_agg *a = &f->agg[set];
	uint64_t ts = u64_at(d + f->p.off_ts);
	double v = (double)(now > ts ? now - ts : 0) / 1e9;
	uint32_t i = 0;
	while (i < f->p.nbounds && v > f->p.bounds[i])
		i++;
	a->hist[i]++;
	a->sum += v;
	a->delivered++;
	if (a->by_sc[sc]++ == 0)
		a->touched[a->ntouched++] = sc;
}

static int take_record(struct tf_fast *f, const uint8_t *d, size_t size)
{
	f->records++;
	uint64_t now = mono_ns();
	if (size < f->p.hdr_size) {
		f->short_records++;
		return 0;
	}
	uint32_t set = d[f->p.off_set];
	uint32_t sc = u16_at(d + f->p.off_syscall);
	if (set >= f->p.nsets || sc >= f->p.nsyscalls)
		return forward(f, d, size, REC_RAW, now);
	/* written by tf_fast_set from other threads while this poll runs */
	uint32_t fl = __atomic_load_n(&f->set_flags[set], __ATOMIC_RELAXED);
	if (fl) {
		uint32_t flags = 0;
		if ((fl & SET_SAMPLE_ALL) ||
		    ((fl & SET_SAMPLE) &&
		     rand32(f) < __atomic_load_n(&f->sample_thr[set], __ATOMIC_RELAXED)))
			flags |= REC_SAMPLE;
		if ((fl & SET_FALLBACK) && has_lost_arg(f, d, size, u16_at(d + f->p.off_kind)))
			flags |= REC_FALLBACK;
		if (!flags && (fl & SET_JSONL) && f->jf) {
			if (tf_jfmt_record(f->jf, d, size, now)) {
				f->jsonl_c++;
				goto aggregate; /* written: counted here as aggregate-only records are */
			}
			f->jsonl_py++; /* declined (reason counted there): Python writes it */
			return forward(f, d, size, 0, now);
		}
		if ((fl & (SET_DELIVER | SET_JSONL)) || flags) {
			if (fl & SET_JSONL)
				f->jsonl_py++;
			return forward(f, d, size, flags, now);
		}
	}
aggregate:
	count_record(f, d, set, sc, now);
	return 0;
}

/* A record decoded outside the poll (the compiled decode, pydecode.c): counted as on_record
 * counts a delivered one. Records of an unknown set or syscall are not counted here (they
 * are forwarded REC_RAW, for Python). */
void tf_fast_count(struct tf_fast *f, const uint8_t *d, size_t size, uint64_t now)
{
	if (size < f->p.hdr_size)
		return;
	uint32_t set = d[f->p.off_set];
	uint32_t sc = u16_at(d + f->p.off_syscall);
	if (set < f->p.nsets && sc < f->p.nsyscalls)
		count_record(f, d, set, sc, now);
}

static int on_sample(void *ctx, void *data, size_t size)
{
	struct tf_fast *f = ctx;
	/* libbpf has moved its consumer position past this record whatever we return: take it
	 * even when aborted (refusing it lost it uncounted), then stop */
	int err = take_record(f, data, size);
	if (err)
		return err;
	return __atomic_load_n(&f->aborted, __ATOMIC_RELAXED) ? -ECANCELED : 0;
}

struct tf_fast *tf_fast_new(const struct tf_fast_params *p, int map_fd)
{
	if (p->abi != TF_FAST_ABI || p->nbounds > MAX_BOUNDS || !p->nsets || !p->nsyscalls ||
	    p->off_ts + 8 > p->hdr_size || p->off_kind + 2 > p->hdr_size ||
	    p->off_syscall + 2 > p->hdr_size || p->off_set >= p->hdr_size ||
	    p->reserve_bytes >= p->batch_bytes) {
		errno = EINVAL;
		return NULL;
	}
	struct tf_fast *f = calloc(1, sizeof(*f));
	if (!f)
		return NULL;
	f->p = *p;
	f->rng = mono_ns() | 1;
	f->set_flags = calloc(p->nsets, sizeof(uint32_t));
	f->sample_thr = calloc(p->nsets, sizeof(uint32_t));
	f->agg = calloc(p->nsets, sizeof(struct set_agg));
	f->batch_cap = p->batch_bytes;
	f->batch = malloc(f->batch_cap);
	if (!f->set_flags || !f->sample_thr || !f->agg || !f->batch)
		goto fail;
	for (uint32_t s = 0; s < p->nsets; s++) {
		f->agg[s].hist = calloc(p->nbounds + 1, sizeof(uint64_t));
		f->agg[s].by_sc = calloc(p->nsyscalls, sizeof(uint64_t));
		f->agg[s].touched = calloc(p->nsyscalls, sizeof(uint32_t));
		if (!f->agg[s].hist || !f->agg[s].by_sc || !f->agg[s].touched)
			goto fail;
	}
	f->rb = ring_buffer__new(map_fd, on_sample, f, NULL);
	if (!f->rb)
		goto fail;
	return f;
fail:;
	int err = errno ? errno : ENOMEM;
	tf_fast_free(f);
	errno = err;
	return NULL;
}

void tf_fast_free(struct tf_fast *f)
{
	if (!f)
		return;
	if (f->rb)
		ring_buffer__free(f->rb);
	if (f->agg)
		for (uint32_t s = 0; s < f->p.nsets; s++) {
			free(f->agg[s].hist);
			free(f->agg[s].by_sc);
			free(f->agg[s].touched);
		}
	free(f->agg);
	free(f->set_flags);
	free(f->sample_thr);
	free(f->batch);
	free(f);
}

int tf_fast_abi(void)
{
	return TF_FAST_ABI;
}

int tf_fast_add(struct tf_fast *f, int map_fd)
{
	return ring_buffer__add(f->rb, map_fd, on_sample, f);
}

int tf_fast_set(struct tf_fast *f, uint32_t set, uint32_t flags, uint32_t sample_thr)
{
	if (set >= f->p.nsets)
		return -EINVAL;
	__atomic_store_n(&f->sample_thr[set], sample_thr, __ATOMIC_RELAXED);
	__atomic_store_n(&f->set_flags[set], flags, __ATOMIC_RELAXED);
	return 0;
}

/* The jsonl formatter records of SET_JSONL sets are written by (NULL: none). */
void tf_fast_set_jsonl(struct tf_fast *f, struct tf_jfmt *jf)
{
	f->jf = jf;
}

/* The flags a set's records are consumed with now (what tf_fast_set last stored). */
uint32_t tf_fast_flags(const struct tf_fast *f, uint32_t set)
{
	return set < f->p.nsets ? __atomic_load_n(&f->set_flags[set], __ATOMIC_RELAXED) : 0;
}

void tf_fast_abort(struct tf_fast *f)
{
	__atomic_store_n(&f->aborted, 1, __ATOMIC_RELAXED);
}

/* Undo tf_fast_abort: the final drain after the consumer thread stopped (it stuck before,
 * and that drain handed over nothing) */
void tf_fast_resume(struct tf_fast *f)
{
	__atomic_store_n(&f->aborted, 0, __ATOMIC_RELAXED);
}

/* Consume what is queued (after waiting up to timeout_ms for a wakeup when timeout_ms >= 0).
 * Returns the records seen, or -errno. Stops early when the batch is full (tf_fast_full):
 * the caller drains the batch and calls again with timeout_ms < 0. */
long tf_fast_poll(struct tf_fast *f, int timeout_ms)
{
	uint64_t before = f->records;
	int err;

	if (f->full)
		return -EBUSY; /* the batch was not drained */
	if (timeout_ms >= 0) {
		err = ring_buffer__poll(f->rb, timeout_ms);
		if (__atomic_load_n(&f->aborted, __ATOMIC_RELAXED))
			goto out;
		if (err < 0 && !f->full && err != -EINTR)
			return err;
	}
	/* records submitted without a wakeup are not signalled: always drain */
	if (!f->full) {
		err = ring_buffer__consume(f->rb);
		if (__atomic_load_n(&f->aborted, __ATOMIC_RELAXED))
			goto out;
		if (err < 0 && !f->full && err != -EINTR)
			return err;
	}
out:
	return (long)(f->records - before);
}

int tf_fast_full(const struct tf_fast *f)
{
	return f->full;
}

/* The batch: entries of struct entry_hdr + record. Valid until tf_fast_reset. */
const uint8_t *tf_fast_batch(const struct tf_fast *f, size_t *len)
{
	*len = f->batch_len;
	return f->batch;
}

void tf_fast_reset(struct tf_fast *f)
{
	f->batch_len = 0;
	f->full = 0;
}

/* counters[0..5] = records seen, forwarded to the batch, shorter than a header, not
 * forwarded for want of memory, lines of SET_JSONL sets made in C, left to Python */
void tf_fast_counters(const struct tf_fast *f, uint64_t *out)
{
	out[4] = f->jsonl_c;
	out[5] = f->jsonl_py;
	out[0] = f->records;
	out[1] = f->forwarded;
	out[2] = f->short_records;
	out[3] = f->nomem;
}

/* Move the aggregates out (they restart at zero) into out (cap words): per set with
 * records, [set, delivered, sum (double bits), ntouched, hist[nbounds + 1],
 * (syscall, count) x ntouched]. Returns words written, or -ENOSPC (nothing moved) when
 * cap is too small. */
long tf_fast_take(struct tf_fast *f, uint64_t *out, size_t cap)
{
	size_t need = 0;
	for (uint32_t s = 0; s < f->p.nsets; s++)
		if (f->agg[s].delivered)
			need += 4 + f->p.nbounds + 1 + 2 * (size_t)f->agg[s].ntouched;
	if (need > cap)
		return -ENOSPC;
	size_t w = 0;
	for (uint32_t s = 0; s < f->p.nsets; s++) {
		struct set_agg *a = &f->agg[s];
		if (!a->delivered)
			continue;
		out[w++] = s;
		out[w++] = a->delivered;
		memcpy(&out[w++], &a->sum, 8);
		out[w++] = a->ntouched;
		memcpy(&out[w], a->hist, (f->p.nbounds + 1) * 8);
		memset(a->hist, 0, (f->p.nbounds + 1) * 8);
		w += f->p.nbounds + 1;
		for (uint32_t i = 0; i < a->ntouched; i++) {
			uint32_t sc = a->touched[i];
			out[w++] = sc;
			out[w++] = a->by_sc[sc];
			a->by_sc[sc] = 0;
		}
		a->ntouched = 0;
		a->delivered = 0;
		a->sum = 0;
	}
	return (long)w;
}

/*
 * perf mmap rings (user_events, read by tracefleet/agent/userevents.py): one call drains
 * one ring of a tracepoint sampled with PERF_SAMPLE_TID | TIME | CPU | RAW into an index of
 * fixed 32-byte entries plus the raw payloads packed 8-byte aligned in a second buffer, so
 * Python decodes the batch by columns instead of walking the ring a record at a time.
 * The perf_event_mmap_page layout is the kernel's ABI (data_head at 1024, data_tail at 1032).
 */
#define PERF_HEAD_OFF 1024
#define PERF_TAIL_OFF 1032
#define PERF_REC_LOST 2
#define PERF_REC_SAMPLE 9
#define PERF_SAMPLE_FIXED 36 /* header 8, pid/tid 8, time 8, cpu/res 8, raw size 4 */

struct tf_perf_entry {
	uint32_t pid, tid;
	uint64_t time;
	uint32_t cpu, raw_off, raw_len, pad;
};

/* n bytes at ring offset pos (modulo size: a record may wrap the end of the ring) */
static void ring_copy(uint8_t *dst, const uint8_t *data, uint64_t size, uint64_t pos, size_t n)
{
	uint64_t at = pos % size;
	size_t first = size - at < n ? (size_t)(size - at) : n;
	memcpy(dst, data + at, first);
	if (first < n)
		memcpy(dst + first, data, n - first);
}

/*
 * counts (4 words, added to): [0] samples lost per PERF_RECORD_LOST notices, [1] malformed
 * records skipped, [2] raw bytes used, [3] 1 when entries or raw space ran out with records
 * left in the ring (call again after consuming this batch). Returns the entries written.
 * The tail is published once, after the last record consumed (release: our reads of the
 * records happen before the kernel may overwrite them); the head is read with acquire.
 */
long tf_perf_drain(uint8_t *page, uint64_t data_off, uint64_t data_size,
		   struct tf_perf_entry *idx, size_t idx_cap, uint8_t *raw, size_t raw_cap,
		   uint64_t *counts)
{
	const uint8_t *data = page + data_off;
	uint64_t head = __atomic_load_n((uint64_t *)(page + PERF_HEAD_OFF), __ATOMIC_ACQUIRE);
	uint64_t tail = __atomic_load_n((uint64_t *)(page + PERF_TAIL_OFF), __ATOMIC_RELAXED);
	size_t n = 0, used = (size_t)counts[2];
	uint8_t rec[PERF_SAMPLE_FIXED];

	if (!data_size)
		return -EINVAL;
	while (tail < head) {
		ring_copy(rec, data, data_size, tail, 8);
		uint32_t type;
		uint16_t size;
		memcpy(&type, rec, 4);
		memcpy(&size, rec + 6, 2);
		if (size < 8 || size > data_size || size > head - tail) {
			/* a corrupt header: skip the rest rather than spin or read past it */
			counts[1]++;
			tail = head;
			break;
		}
		if (type == PERF_REC_LOST) {
			uint8_t lost[24];
			if (size >= 24) {
				ring_copy(lost, data, data_size, tail, 24);
				counts[0] += u64_at(lost + 16);
			} else {
				counts[1]++;
			}
		} else if (type == PERF_REC_SAMPLE) {
			uint32_t rawlen;
			if (size < PERF_SAMPLE_FIXED) {
				counts[1]++;
				tail += size;
				continue;
			}
			ring_copy(rec, data, data_size, tail, PERF_SAMPLE_FIXED);
			memcpy(&rawlen, rec + 32, 4);
			if (PERF_SAMPLE_FIXED + (uint64_t)rawlen > size) {
				counts[1]++;
				tail += size;
				continue;
			}
			size_t padded = ((size_t)rawlen + 7) & ~(size_t)7;
			if (n == idx_cap || raw_cap - used < padded) {
				counts[3] = 1; /* this record stays in the ring for the next call */
				break;
			}
			struct tf_perf_entry *e = &idx[n++];
			memcpy(&e->pid, rec + 8, 4);
			memcpy(&e->tid, rec + 12, 4);
			memcpy(&e->time, rec + 16, 8);
			memcpy(&e->cpu, rec + 24, 4);
			e->raw_off = (uint32_t)used;
			e->raw_len = rawlen;
			e->pad = 0;
			ring_copy(raw + used, data, data_size, tail + PERF_SAMPLE_FIXED, rawlen);
			memset(raw + used + rawlen, 0, padded - rawlen);
			used += padded;
		}
		tail += size;
	}
	__atomic_store_n((uint64_t *)(page + PERF_TAIL_OFF), tail, __ATOMIC_RELEASE);
	counts[2] = used;
	return (long)n;
}
