/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The record walker (jsonfmt.c) and what it hands its emitters: one reading of a ring record
 * (which fields and arguments the event has, in which order, which values are shown, which
 * names apply) as a view; the emitters only spell it: JSON text (jsonfmt.c, the jsonl line)
 * or Python objects (pydecode.c, the dict of decode.py). The walker and its tables live in
 * libtfring.so; the Python emitter (the _tfdecode extension) calls it through the addresses
 * Python hands over (tf_walk_fns), checked against TF_WALK_ABI and the view's size.
 */
#ifndef TF_WALK_H
#define TF_WALK_H

#include <stddef.h>
#include <stdint.h>

#define TF_WALK_ABI 1
#define TF_NAME_MAX_LEN 48
#define TF_MAX_FLAGBITS 32
#define TF_VIEW_ARGS 16

struct tf_jfmt;

/* a name handed over by Python, JSON-encoded (quotes included); len 0: no name */
struct name {
	uint8_t len;
	char s[TF_NAME_MAX_LEN];
};

/* tracefleet.model.event.FlagTable: accmode names for raw & 3 (when accmode), then bits in
 * order (a bit set whole is named and removed), then the rest in hex */
struct tf_jfmt_flagtab {
	uint32_t accmode, nbits;
	struct name acc[4];
	uint64_t mask[TF_MAX_FLAGBITS];
	struct name bit[TF_MAX_FLAGBITS];
};

/* the names of a flags value, in the model's order; *rest: what no name covers (shown in
 * hex when not 0). Returns how many names. */
static inline uint32_t tf_flag_names(const struct tf_jfmt_flagtab *t, uint64_t raw,
				     const struct name **out, uint64_t *rest)
{
	uint32_t n = 0;
	uint64_t r = raw;
	if (t->accmode) {
		out[n++] = &t->acc[raw & 3];
		r = raw & ~(uint64_t)3;
	}
	for (uint32_t i = 0; i < t->nbits && i < TF_MAX_FLAGBITS; i++) {
		uint64_t m = t->mask[i];
		if (m && (r & m) == m) {
			out[n++] = &t->bit[i];
			r &= ~m;
		}
	}
	*rest = r;
	return n;
}

/* a string head of the record (struct tf_str / tf_blob without its buffer) */
struct strh {
	uint64_t uptr;
	int32_t err;
	uint16_t len;
	uint8_t status, strategy;
	const uint8_t *data;
};

/* one argument of the event: decode.py's argument dicts, by type */
enum {
	TF_A_INT = 1,  /* {"value": int, "status": "ok", "strategy": "register"[, "names"]} */
	TF_A_STR,      /* str_arg: value (shown: vlen bytes as text) status strategy addr [error] */
	TF_A_BLOB,     /* blob_arg: value (open_how or sockaddr dict) status strategy addr [error] */
	TF_A_ARGV,     /* exec argv: value (list of argc texts) status strategy addr [error] */
	TF_A_VPATH,    /* vfs_path_arg: value status strategy [error] kind */
	TF_A_PLAIN,    /* _plain(int): {"value": v, "status": "ok", "strategy": "kernel"} [names] */
	TF_A_PLAIN_OPT,  /* _plain(v or None): None when 0 */
	TF_A_PLAIN_DEV,  /* _plain(dev_label(v)): "major:minor" */
	TF_A_PLAIN_TEXT, /* _plain(text): vlen bytes of data */
};

enum { TF_BLOB_OPEN_HOW = 1, TF_BLOB_SOCKADDR = 2 };

struct tf_varg {
	uint8_t type;
	uint8_t shown; /* STR, BLOB, ARGV, VPATH: the value is shown (else null) */
	uint8_t blob;  /* BLOB: TF_BLOB_* */
	const struct name *key;
	const struct name *status, *strategy; /* NULL: no name (Python: unknown(N)) */
	const struct name *errn; /* error < 0 with a name; NULL otherwise */
	const struct name *kind; /* VPATH: the path kind's label */
	const struct tf_jfmt_flagtab *flags; /* INT, PLAIN: names are added; NULL: none */
	int64_t v;     /* INT, PLAIN*: the value */
	uint32_t vlen; /* STR, VPATH, PLAIN_TEXT: bytes of the value (up to a NUL); ARGV: argc */
	struct strh s; /* STR, BLOB, ARGV (data: the first u16-prefixed argument), VPATH */
};

struct tf_view {
	uint32_t kind, set, sc;
	const struct name *setn, *scn, *hstrat; /* NULL: no name (Python: the number) */
	uint8_t hstrat_code;
	int ctx; /* ppid, uid, gid are known */
	uint64_t ts, wall, duration, latency, cgroup;
	int64_t ret;
	uint32_t pid, tid, ppid, uid, gid;
	const uint8_t *comm;
	uint32_t clen;
	uint32_t spec_ok; /* the set and syscall have an argument spec */
	uint32_t nargs;
	struct tf_varg args[TF_VIEW_ARGS];
};

/* an exe found for a record: bytes, or why none (-1: known) */
struct exe_res {
	const uint8_t *s;
	uint32_t len;
	int why;
};

/* why a record is declined (counters, in this order; jsonfmt.py names them) */
enum {
	WHY_KIND = 0,    /* the jsonl line: not a syscall record */
	WHY_MALFORMED,   /* lengths do not add up: Python reports the decode error */
	WHY_NAME,        /* a set, syscall, status or strategy without a name here */
	WHY_SPEC,        /* no argument spec for the set and syscall */
	WHY_BLOB,        /* a blob only Python renders (socket address, short open_how) */
	WHY_IDENT,       /* the cgroup's workload fields are not settled yet */
	WHY_SPACE,       /* the line does not fit the buffer */
	WHY_OUTPUT,      /* the output failed (the fd is broken) */
	WHY_MOUNTS,      /* a vfs path that needs the mount table (mount-relative, no device) */
	WHY_MAX,
};

/* the walker, as libtfring.so exports it (addresses handed to the Python emitter) */
typedef int (*tf_walk_fn)(struct tf_jfmt *j, const uint8_t *d, size_t size, uint64_t now_ns,
			  int64_t offset_ns, struct tf_view *v);
typedef void (*tf_walk_exe_fn)(struct tf_jfmt *j, const uint8_t *d, struct exe_res *r);
typedef void (*tf_walk_kept_fn)(struct tf_jfmt *j, const struct exe_res *r);
/* fastring.c: a record's aggregates (what on_record counts for a delivered record) */
struct tf_fast;
typedef void (*tf_fast_count_fn)(struct tf_fast *f, const uint8_t *d, size_t size,
				 uint64_t now);

/* batch entry of fastring.c: u32 size, u32 flags, u64 receive time, record, padded to 8 */
struct entry_hdr {
	uint32_t size;
	uint32_t flags;
	uint64_t recv_ns;
};

/* per batch entry flags (fastring.c) */
#define REC_SAMPLE 1u
#define REC_FALLBACK 2u
#define REC_RAW 4u /* unknown set or syscall: Python handles it entirely */

#endif
