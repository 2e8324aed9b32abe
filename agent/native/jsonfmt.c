// SPDX-License-Identifier: Apache-2.0
/*
 * tracefleet compiled jsonl formatter (configured with ctypes by
 * tracefleet/agent/capture/jsonfmt.py; called per record by fastring.c).
 *
 * For `capture -o jsonl`: a syscall record (TF_KIND_SYSCALL) becomes the line Python would
 * write for it (json.dumps(Event.to_json(), separators=(",", ":")), ensure_ascii), in an
 * output buffer written to the output fd when full and after each poll. No Python call and
 * no allocation per record.
 *
 * No table is defined here: the record layout (abi.py), the names of sets, syscalls,
 * statuses, strategies and errnos, the flag tables (tracefleet.model.event), the argument
 * specs (eventsets.py), the realtime offset (decode.WALL_CLOCK) and each cgroup's workload
 * fields (workload.py, rendered by the model) are handed over by Python, names already
 * JSON-encoded. What this code cannot make exactly as Python would (an unknown name, a
 * socket address, a cgroup not attributed yet, a malformed record, ...) it declines: the
 * record goes to Python, and the reason is counted.
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <bpf/bpf.h>

#include "jsonfmt.h"
#include "rdbytes.h"
#include "walk.h"

#define TF_JFMT_ABI 3
#define NAME_MAX_LEN TF_NAME_MAX_LEN
#define MAX_SETS 16
#define MAX_SYSCALLS 128
#define MAX_CODES 32     /* statuses, strategies, path kinds */
#define MAX_ERRNO 256
#define MAX_INTS 6
#define MAX_STRS 2
#define MAX_FLAGTABS 16
#define MAX_FLAGBITS TF_MAX_FLAGBITS
#define MAX_PLAIN 6      /* vfs: counters of an operation (close) */
#define IDENT_SLOTS 4096 /* power of two */
#define IDENT_POOL (512 * 1024)
#define LINE_MAX_BYTES 32768 /* bound of one line (escaping is at most 6 bytes per byte) */
#define EXE_SLOTS 8192 /* power of two; cleared when half full or the pool is */
#define EXE_POOL (1024 * 1024)
#define EXE_VALUE_MAX 8192 /* bound of the tf_exes value (struct tf_str) handed over */
#define EXE_KEY_MAX 64

/* why an exe is unknown, in the order of capture/exe.py's CAUSES (jsonfmt.py names them) */
enum { EXE_NO_MM = 0, EXE_NOT_IN_MAP, EXE_TRUNCATED, EXE_LOOKUP, EXE_WHY_MAX };

/* keys of decode.py's fixed arguments (TAB_KEY codes) */
enum { KEY_FILENAME = 0, KEY_ARGV, KEY_PATH, KEY_INODE, KEY_DEV, KEY_FSTYPE, KEY_MAX };

struct tf_jfmt_params {
	uint32_t abi;
	/* struct tf_hdr */
	uint32_t hdr_size, off_ts, off_exit, off_cgroup, off_ret, off_pid, off_tid, off_kind,
		off_syscall, off_set, off_strategy, off_comm, comm_len, off_ppid, off_uid, off_gid,
		off_ctx_ok;
	/* struct tf_event and the record encoding */
	uint32_t kind_syscall, off_iargs, off_strings;
	uint32_t strh_size, strh_uptr_off, strh_err_off, strh_len_off, strh_status_off,
		strh_strategy_off;
	uint32_t str_max, blob_max; /* largest len of a string, of the blob */
	uint32_t status_none;
	uint32_t shown_mask, blob_shown_mask; /* statuses whose bytes are shown (bit per code) */
	uint32_t need_ident; /* 1: every line carries its cgroup's workload fields */
	uint32_t out_bytes;
	/* the executable: identity in the header, tf_exes key (struct tf_exe_key) and value
	 * (struct tf_str, read with the strh_* offsets above) */
	uint32_t off_exe_ino, off_exe_dev, off_exe_gen;
	uint32_t exe_key_size, exe_key_ino_off, exe_key_dev_off, exe_key_gen_off;
	uint32_t exe_value_size, status_ok, status_truncated;
	int32_t fd; /* -1: no output (the tables and walker only, for the Python emitter) */
	int32_t exe_fd; /* tf_exes, -1: none (every exe unknown, as exe.py's ExeResolver(-1)) */
	/* struct tf_exec_event: the fixed part ends at the filename head; the argv head
	 * (argvh_size bytes: uptr, err, argc, status, strategy at these offsets) follows the
	 * filename, then argc arguments of a u16 length and that many bytes */
	uint32_t kind_exec, off_exec_filename, argvh_size, argvh_uptr_off, argvh_err_off,
		argvh_argc_off, argvh_status_off, argvh_strategy_off, argv_count, arg_max,
		argv_shown_mask;
	/* struct tf_vfs_event: the fixed part ends at the path head; path and path2 follow */
	uint32_t kind_vfs, off_vfs_ino, off_vfs_arg, off_vfs_dev, off_vfs_path_kind,
		off_vfs_path2_kind, off_vfs_fstype, fstype_len, off_vfs_path, pathkind_mount_rel;
};

/* one syscall's arguments (eventsets.ArgSpec), keys JSON-encoded */
struct tf_jfmt_spec {
	uint32_t nints, nstrs, blob; /* blob: 0 none, 1 open_how, 2 another kind (Python) */
	uint32_t int_idx[MAX_INTS];
	uint32_t int32[MAX_INTS];   /* 1: an `int` argument (upper half of the register dropped) */
	int32_t flagtab[MAX_INTS];  /* flag table of the argument, -1: none */
	struct name int_key[MAX_INTS];
	struct name str_key[MAX_STRS];
	struct name blob_key;
	struct name kpath_key; /* the open family's kernel path */
	uint32_t valid;
};

/* a vfs operation's arguments beyond path, inode, dev and fstype (decode.py's _VFS_PATH2,
 * _VFS_ARG and vfs_close's counters), by syscall code */
struct tf_jfmt_vfsop {
	struct name path2_key; /* len 0: none */
	struct name arg_key;   /* len 0: none */
	int32_t arg_flagtab;   /* -1: none */
	uint32_t nplain;
	struct name plain_key[MAX_PLAIN];
	uint32_t plain_off[MAX_PLAIN], plain_size[MAX_PLAIN]; /* offset in the record, 4 or 8 */
};

struct ident {
	uint64_t cgroup;
	uint32_t off, len; /* len 0: empty slot ... unless used (a cgroup with no fields) */
	uint32_t used;
};

/* one cached executable: identity -> path bytes in exe_pool (the value of tf_exes) */
struct exe_slot {
	uint64_t ino;
	uint32_t dev, gen;
	uint32_t off, len;
	uint32_t used;
};

struct tf_jfmt {
	struct tf_jfmt_params p;
	struct name sets[MAX_SETS];
	struct name syscalls[MAX_SYSCALLS];
	struct name statuses[MAX_CODES];
	struct name strategies[MAX_CODES];
	struct name errnos[MAX_ERRNO];
	struct tf_jfmt_spec specs[MAX_SETS][MAX_SYSCALLS];
	struct tf_jfmt_flagtab flagtabs[MAX_FLAGTABS];
	struct name pathkinds[MAX_CODES];
	struct name keys[KEY_MAX];
	struct tf_jfmt_vfsop vfsops[MAX_SYSCALLS];
	int64_t offset; /* CLOCK_REALTIME - CLOCK_MONOTONIC, ns: atomic */
	pthread_mutex_t ident_lock;
	struct ident idents[IDENT_SLOTS];
	uint32_t nidents;
	char ident_pool[IDENT_POOL];
	uint32_t pool_used;
	char *out;
	size_t out_len, out_cap;
	int werr; /* sticky write error (positive errno) */
	uint64_t written;
	uint64_t declined[WHY_MAX];
	uint64_t bytes_out;
	uint64_t tsec; /* put_time's last second and its text */
	int tsec_ok;
	char tday[24];
	/* the executable cache: used from the polling thread only (and tests before it runs) */
	struct exe_slot exes[EXE_SLOTS];
	uint32_t nexes, exe_pool_used;
	uint8_t exe_pool[EXE_POOL];
	uint8_t exe_value[EXE_VALUE_MAX];
	uint64_t exe_unknown[EXE_WHY_MAX];
	uint64_t exe_lookups;
};

/* ---- the line being built -------------------------------------------------------------- */

struct lb {
	char *p, *end;
	int over;
};

static inline void put(struct lb *b, const char *s, size_t n)
{
	if ((size_t)(b->end - b->p) < n) {
		b->over = 1;
		return;
	}
	memcpy(b->p, s, n);
	b->p += n;
}

#define PUTS(b, lit) put((b), (lit), sizeof(lit) - 1)

static inline void putc1(struct lb *b, char c)
{
	if (b->p >= b->end) {
		b->over = 1;
		return;
	}
	*b->p++ = c;
}

static inline void put_name(struct lb *b, const struct name *n)
{
	put(b, n->s, n->len);
}

static const char DIGITS2[201] = "00010203040506070809101112131415161718192021222324252627282930"
				 "31323334353637383940414243444546474849505152535455565758596061"
				 "62636465666768697071727374757677787980818283848586878889909192"
				 "93949596979899";

/* decimal, two digits per step */
static void put_u64(struct lb *b, uint64_t v)
{
	char tmp[20];
	int i = sizeof(tmp);
	while (v >= 100) {
		uint32_t r = (uint32_t)(v % 100);
		v /= 100;
		i -= 2;
		memcpy(tmp + i, DIGITS2 + 2 * r, 2);
	}
	if (v >= 10) {
		i -= 2;
		memcpy(tmp + i, DIGITS2 + 2 * v, 2);
	} else {
		tmp[--i] = (char)('0' + v);
	}
	put(b, tmp + i, sizeof(tmp) - (size_t)i);
}

static void put_i64(struct lb *b, int64_t v)
{
	if (v < 0) {
		putc1(b, '-');
		put_u64(b, (uint64_t)0 - (uint64_t)v);
	} else {
		put_u64(b, (uint64_t)v);
	}
}

static const char HEX[] = "0123456789abcdef";

/* Python's hex(): 0x and lowercase digits, no padding */
static void put_hex(struct lb *b, uint64_t v)
{
	char tmp[18];
	int i = sizeof(tmp);
	do {
		tmp[--i] = HEX[v & 15];
		v >>= 4;
	} while (v && i > 2);
	tmp[--i] = 'x';
	tmp[--i] = '0';
	put(b, tmp + i, sizeof(tmp) - (size_t)i);
}

static void put_u4(struct lb *b, uint32_t u)
{
	char t[6] = {'\\', 'u', HEX[(u >> 12) & 15], HEX[(u >> 8) & 15], HEX[(u >> 4) & 15],
		     HEX[u & 15]};
	put(b, t, 6);
}

static inline int cont(uint8_t c)
{
	return (c & 0xC0) == 0x80;
}

/* Length of the valid UTF-8 sequence at s (n bytes left) as Python's strict decoder takes
 * it (no overlongs, no surrogates, nothing above U+10FFFF), its code point in *cp; 0 if
 * s[0] does not start one. */
static int utf8_seq(const uint8_t *s, size_t n, uint32_t *cp)
{
	uint8_t c = s[0];
	if (c >= 0xC2 && c <= 0xDF) {
		if (n < 2 || !cont(s[1]))
			return 0;
		*cp = ((uint32_t)(c & 0x1F) << 6) | (s[1] & 0x3F);
		return 2;
	}
	if (c >= 0xE0 && c <= 0xEF) {
		if (n < 3 || !cont(s[1]) || !cont(s[2]))
			return 0;
		if ((c == 0xE0 && s[1] < 0xA0) || (c == 0xED && s[1] > 0x9F))
			return 0;
		*cp = ((uint32_t)(c & 0x0F) << 12) | ((uint32_t)(s[1] & 0x3F) << 6) | (s[2] & 0x3F);
		return 3;
	}
	if (c >= 0xF0 && c <= 0xF4) {
		if (n < 4 || !cont(s[1]) || !cont(s[2]) || !cont(s[3]))
			return 0;
		if ((c == 0xF0 && s[1] < 0x90) || (c == 0xF4 && s[1] > 0x8F))
			return 0;
		*cp = ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(s[1] & 0x3F) << 12) |
		      ((uint32_t)(s[2] & 0x3F) << 6) | (s[3] & 0x3F);
		return 4;
	}
	return 0;
}

/*
 * The JSON string of bytes as decode.text() and json.dumps make it: decoded as UTF-8 with
 * errors="backslashreplace" (a byte no valid sequence starts at becomes the four characters
 * \xNN, lowercase), then escaped with ensure_ascii (", \, \b \f \n \r \t, other characters
 * below 0x20 or from 0x7f as \u00XX, above U+FFFF as a surrogate pair). A byte inside
 * Python's error range is a continuation byte, which starts no sequence here either, so
 * the byte-at-a-time rule yields the same text.
 */
static void put_jstr(struct lb *b, const uint8_t *s, size_t n)
{
	putc1(b, '"');
	for (size_t i = 0; i < n && !b->over;) {
		uint8_t c = s[i];
		if (c < 0x80) {
			i++;
			if (c >= 0x20 && c < 0x7F && c != '"' && c != '\\') {
				putc1(b, (char)c);
				continue;
			}
			switch (c) {
			case '"': PUTS(b, "\\\""); break;
			case '\\': PUTS(b, "\\\\"); break;
			case '\n': PUTS(b, "\\n"); break;
			case '\r': PUTS(b, "\\r"); break;
			case '\t': PUTS(b, "\\t"); break;
			case '\b': PUTS(b, "\\b"); break;
			case '\f': PUTS(b, "\\f"); break;
			default: put_u4(b, c);
			}
			continue;
		}
		uint32_t cp = 0;
		int k = utf8_seq(s + i, n - i, &cp);
		if (!k) {
			char t[5] = {'\\', '\\', 'x', HEX[c >> 4], HEX[c & 15]};
			put(b, t, 5);
			i++;
			continue;
		}
		i += (size_t)k;
		if (cp >= 0x10000) {
			uint32_t v = cp - 0x10000;
			put_u4(b, 0xD800 | (v >> 10));
			put_u4(b, 0xDC00 | (v & 0x3FF));
		} else {
			put_u4(b, cp);
		}
	}
	putc1(b, '"');
}

/* time_text(): RFC 3339 UTC with microseconds; the date and time of day of the last second
 * are kept (records come in time order, mostly within the same second) */
static void put_time(struct lb *b, struct tf_jfmt *j, uint64_t ns)
{
	if (!ns) {
		PUTS(b, "null");
		return;
	}
	uint64_t secs = ns / 1000000000ull;
	if (secs != j->tsec || !j->tsec_ok) {
		time_t ts = (time_t)secs;
		struct tm tm;
		int y;
		if (!gmtime_r(&ts, &tm) || (y = tm.tm_year + 1900) < 1 || y > 9999) {
			b->over = 1;
			return;
		}
		char *t = j->tday;
		t[0] = '"';
		t[1] = (char)('0' + y / 1000);
		t[2] = (char)('0' + y / 100 % 10);
		t[3] = (char)('0' + y / 10 % 10);
		t[4] = (char)('0' + y % 10);
		t[5] = '-';
		t[6] = (char)('0' + (tm.tm_mon + 1) / 10);
		t[7] = (char)('0' + (tm.tm_mon + 1) % 10);
		t[8] = '-';
		t[9] = (char)('0' + tm.tm_mday / 10);
		t[10] = (char)('0' + tm.tm_mday % 10);
		t[11] = 'T';
		t[12] = (char)('0' + tm.tm_hour / 10);
		t[13] = (char)('0' + tm.tm_hour % 10);
		t[14] = ':';
		t[15] = (char)('0' + tm.tm_min / 10);
		t[16] = (char)('0' + tm.tm_min % 10);
		t[17] = ':';
		t[18] = (char)('0' + tm.tm_sec / 10);
		t[19] = (char)('0' + tm.tm_sec % 10);
		t[20] = '.';
		j->tsec = secs;
		j->tsec_ok = 1;
	}
	char t[29];
	memcpy(t, j->tday, 21);
	uint32_t us = (uint32_t)(ns % 1000000000ull / 1000);
	for (int i = 0; i < 6; i++) {
		t[26 - i] = (char)('0' + us % 10);
		us /= 10;
	}
	t[27] = 'Z';
	t[28] = '"';
	put(b, t, 29);
}

/* ---- record fields --------------------------------------------------------------------- */

static int read_strh(const struct tf_jfmt *j, const uint8_t *d, size_t size, size_t *off,
		     uint32_t limit, struct strh *h)
{
	const struct tf_jfmt_params *p = &j->p;
	if (*off + p->strh_size > size)
		return -1;
	const uint8_t *s = d + *off;
	h->uptr = u64_at(s + p->strh_uptr_off);
	h->err = (int32_t)u32_at(s + p->strh_err_off);
	h->len = u16_at(s + p->strh_len_off);
	h->status = s[p->strh_status_off];
	h->strategy = s[p->strh_strategy_off];
	if (h->len > limit || *off + p->strh_size + h->len > size)
		return -1;
	h->data = s + p->strh_size;
	*off += p->strh_size + h->len;
	return 0;
}

static inline const struct name *code_name(const struct name *tab, uint32_t n, uint32_t code)
{
	return code < n && tab[code].len ? &tab[code] : NULL;
}

/* the workload fields of a cgroup (with their leading commas); 0 when not settled */
static int ident_find(struct tf_jfmt *j, uint64_t cg, uint32_t *off, uint32_t *len)
{
	uint32_t h = (uint32_t)((cg * 0x9E3779B97F4A7C15ull) >> 52) & (IDENT_SLOTS - 1);
	for (uint32_t n = 0; n < IDENT_SLOTS; n++) {
		struct ident *e = &j->idents[(h + n) & (IDENT_SLOTS - 1)];
		if (!e->used)
			return 0;
		if (e->cgroup == cg) {
			*off = e->off;
			*len = e->len;
			return 1;
		}
	}
	return 0;
}

static int flush_out(struct tf_jfmt *j)
{
	size_t done = 0;
	if (j->werr)
		return -j->werr;
	while (done < j->out_len) {
		ssize_t w = write(j->p.fd, j->out + done, j->out_len - done);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			j->werr = errno;
			break;
		}
		done += (size_t)w;
	}
	j->bytes_out += done;
	if (done < j->out_len)
		memmove(j->out, j->out + done, j->out_len - done);
	j->out_len -= done;
	return j->werr ? -j->werr : 0;
}

static inline uint32_t exe_hash(uint64_t ino, uint32_t dev, uint32_t gen)
{
	uint64_t h = (ino ^ ((uint64_t)dev << 32) ^ gen) * 0x9E3779B97F4A7C15ull;
	return (uint32_t)(h >> 40) & (EXE_SLOTS - 1);
}

static void exe_clear(struct tf_jfmt *j)
{
	memset(j->exes, 0, sizeof(j->exes));
	j->nexes = 0;
	j->exe_pool_used = 0;
}

/* the slot of an identity, or the empty slot where it would go */
static struct exe_slot *exe_slot(struct tf_jfmt *j, uint64_t ino, uint32_t dev, uint32_t gen)
{
	uint32_t h = exe_hash(ino, dev, gen);
	for (uint32_t n = 0; n < EXE_SLOTS; n++) {
		struct exe_slot *e = &j->exes[(h + n) & (EXE_SLOTS - 1)];
		if (!e->used || (e->ino == ino && e->dev == dev && e->gen == gen))
			return e;
	}
	return NULL; /* not reached: at most half the slots are used */
}

/* keep a path (bounded: the whole cache is dropped when full, refilled from tf_exes on
 * demand, as exe.py's ExeResolver does) */
static const uint8_t *exe_put(struct tf_jfmt *j, uint64_t ino, uint32_t dev, uint32_t gen,
			      const uint8_t *path, uint32_t len)
{
	if (j->nexes >= EXE_SLOTS / 2 || j->exe_pool_used + len > EXE_POOL)
		exe_clear(j);
	struct exe_slot *e = exe_slot(j, ino, dev, gen);
	if (!e || len > EXE_POOL)
		return NULL;
	if (!e->used)
		j->nexes++;
	memcpy(j->exe_pool + j->exe_pool_used, path, len);
	e->ino = ino;
	e->dev = dev;
	e->gen = gen;
	e->off = j->exe_pool_used;
	e->len = len;
	e->used = 1;
	j->exe_pool_used += len;
	return j->exe_pool + e->off;
}

/* The record's executable as exe.py's ExeResolver.path resolves it: none for a kernel thread
 * (inode 0); from the cache; else one lookup in tf_exes, whose value is kept when OK (not
 * TRUNCATED, not another status). An unknown one is not cached: the kernel walks it again. */
static void exe_resolve(struct tf_jfmt *j, const uint8_t *d, struct exe_res *r)
{
	const struct tf_jfmt_params *p = &j->p;
	uint64_t ino = u64_at(d + p->off_exe_ino);
	uint32_t dev = u32_at(d + p->off_exe_dev), gen = u32_at(d + p->off_exe_gen);
	r->s = NULL;
	r->len = 0;
	if (!ino) {
		r->why = EXE_NO_MM;
		return;
	}
	struct exe_slot *e = exe_slot(j, ino, dev, gen);
	if (e && e->used) {
		r->s = j->exe_pool + e->off;
		r->len = e->len;
		r->why = -1;
		return;
	}
	if (p->exe_fd < 0) {
		r->why = EXE_NOT_IN_MAP;
		return;
	}
	uint8_t key[EXE_KEY_MAX];
	memset(key, 0, sizeof(key));
	memcpy(key + p->exe_key_ino_off, &ino, 8);
	memcpy(key + p->exe_key_dev_off, &dev, 4);
	memcpy(key + p->exe_key_gen_off, &gen, 4);
	j->exe_lookups++;
	int rc = bpf_map_lookup_elem(p->exe_fd, key, j->exe_value);
	if (rc) {
		r->why = rc == -ENOENT || errno == ENOENT ? EXE_NOT_IN_MAP : EXE_LOOKUP;
		return;
	}
	uint8_t status = j->exe_value[p->strh_status_off];
	if (status != p->status_ok) {
		r->why = status == p->status_truncated ? EXE_TRUNCATED : EXE_NOT_IN_MAP;
		return;
	}
	uint32_t len = u16_at(j->exe_value + p->strh_len_off);
	if (len > p->str_max)
		len = p->str_max;
	r->s = exe_put(j, ino, dev, gen, j->exe_value + p->strh_size, len);
	r->len = len;
	r->why = r->s ? -1 : EXE_LOOKUP;
}

/* ---- the walker: one reading of a record, for both emitters ---------------------------- */

static const struct tf_jfmt_vfsop NO_VFSOP = {.arg_flagtab = -1};

static inline uint32_t upto_nul(const uint8_t *s, uint32_t n)
{
	const uint8_t *z = memchr(s, 0, n);
	return z ? (uint32_t)(z - s) : n;
}

static inline int shown(uint32_t mask, uint8_t status)
{
	return status < 32 && (mask >> status & 1);
}

static struct tf_varg *add_arg(struct tf_view *v, uint8_t type, const struct name *key)
{
	struct tf_varg *a = &v->args[v->nargs++]; /* bounded: at most TF_VIEW_ARGS per kind */
	memset(a, 0, sizeof(*a));
	a->type = type;
	a->key = key;
	return a;
}

/* a captured argument (string, blob, argv, vfs path): its head and the names of its tail */
static struct tf_varg *add_captured(const struct tf_jfmt *j, struct tf_view *v, uint8_t type,
				    const struct name *key, const struct strh *h, uint32_t mask)
{
	struct tf_varg *a = add_arg(v, type, key);
	a->s = *h;
	a->shown = (uint8_t)shown(mask, h->status);
	a->status = code_name(j->statuses, MAX_CODES, h->status);
	a->strategy = code_name(j->strategies, MAX_CODES, h->strategy);
	if (h->err < 0) {
		uint32_t e = (uint32_t)(-(int64_t)h->err);
		a->errn = e < MAX_ERRNO && j->errnos[e].len ? &j->errnos[e] : NULL;
	}
	return a;
}

/* decode.py's _int_args: each integer argument of the spec, flag names where it has some */
static void walk_ints(const struct tf_jfmt *j, const uint8_t *d, const struct tf_jfmt_spec *spec,
		      struct tf_view *v)
{
	for (uint32_t i = 0; spec && i < spec->nints && i < MAX_INTS; i++) {
		int64_t x = (int64_t)u64_at(d + j->p.off_iargs + 8 * spec->int_idx[i]);
		if (spec->int32[i])
			x = (int32_t)(uint32_t)(uint64_t)x;
		struct tf_varg *a = add_arg(v, TF_A_INT, &spec->int_key[i]);
		a->v = x;
		if (spec->flagtab[i] >= 0 && spec->flagtab[i] < MAX_FLAGTABS)
			a->flags = &j->flagtabs[spec->flagtab[i]];
	}
}

static int walk_syscall(const struct tf_jfmt *j, const uint8_t *d, size_t size,
			const struct tf_jfmt_spec *spec, struct tf_view *v)
{
	const struct tf_jfmt_params *p = &j->p;
	struct strh s[3];
	size_t off = p->off_strings;
	if (size < off || read_strh(j, d, size, &off, p->str_max, &s[0]) ||
	    read_strh(j, d, size, &off, p->str_max, &s[1]) ||
	    read_strh(j, d, size, &off, p->blob_max, &s[2]) || off != size)
		return WHY_MALFORMED;
	if (!spec)
		return -1; /* eventsets.arg_spec: an empty spec, no arguments */
	walk_ints(j, d, spec, v);
	for (uint32_t i = 0; i < spec->nstrs && i < MAX_STRS; i++) {
		struct tf_varg *a = add_captured(j, v, TF_A_STR, &spec->str_key[i], &s[i], p->shown_mask);
		a->vlen = upto_nul(s[i].data, s[i].len); /* a c_char array reads up to a NUL */
	}
	if (spec->nstrs == 1 && s[1].status != p->status_none) {
		/* open family: the file the returned fd names, resolved in the kernel at exit */
		struct tf_varg *a = add_captured(j, v, TF_A_STR, &spec->kpath_key, &s[1], p->shown_mask);
		a->vlen = upto_nul(s[1].data, s[1].len);
	}
	if (spec->blob) {
		struct tf_varg *a =
			add_captured(j, v, TF_A_BLOB, &spec->blob_key, &s[2], p->blob_shown_mask);
		a->blob = (uint8_t)spec->blob;
		a->vlen = s[2].len; /* a u8 array: every byte */
	}
	return -1;
}

static int walk_exec(const struct tf_jfmt *j, const uint8_t *d, size_t size,
		     const struct tf_jfmt_spec *spec, struct tf_view *v)
{
	const struct tf_jfmt_params *p = &j->p;
	struct strh fname, argv;
	size_t off = p->off_exec_filename;
	if (size < off || read_strh(j, d, size, &off, p->str_max, &fname) ||
	    off + p->argvh_size > size)
		return WHY_MALFORMED;
	const uint8_t *h = d + off;
	argv.uptr = u64_at(h + p->argvh_uptr_off);
	argv.err = (int32_t)u32_at(h + p->argvh_err_off);
	argv.len = u16_at(h + p->argvh_argc_off); /* argc */
	argv.status = h[p->argvh_status_off];
	argv.strategy = h[p->argvh_strategy_off];
	off += p->argvh_size;
	if (argv.len > p->argv_count)
		return WHY_MALFORMED;
	argv.data = d + off;
	for (uint32_t i = 0; i < argv.len; i++) {
		if (off + 2 > size)
			return WHY_MALFORMED;
		uint32_t n = u16_at(d + off);
		off += 2;
		if (n > p->arg_max || off + n > size)
			return WHY_MALFORMED;
		off += n;
	}
	if (off != size)
		return WHY_MALFORMED;
	walk_ints(j, d, spec, v);
	struct tf_varg *a = add_captured(j, v, TF_A_STR, &j->keys[KEY_FILENAME], &fname,
					 p->shown_mask);
	a->vlen = upto_nul(fname.data, fname.len);
	a = add_captured(j, v, TF_A_ARGV, &j->keys[KEY_ARGV], &argv, p->argv_shown_mask);
	a->vlen = argv.len;
	return -1;
}

/* decode.py's vfs_path_arg; declined where the mount table is needed */
static int walk_vpath(const struct tf_jfmt *j, struct tf_view *v, const struct name *key,
		      const struct strh *h, uint8_t kind)
{
	const struct name *kn = code_name(j->pathkinds, MAX_CODES, kind);
	if (!kn)
		return WHY_NAME;
	struct tf_varg *a = add_captured(j, v, TF_A_VPATH, key, h, j->p.shown_mask);
	a->kind = kn;
	a->vlen = upto_nul(h->data, h->len);
	if (kind == j->p.pathkind_mount_rel && a->shown)
		return WHY_MOUNTS; /* the mount point is prefixed from the mount table */
	return -1;
}

static int walk_vfs(const struct tf_jfmt *j, const uint8_t *d, size_t size, struct tf_view *v)
{
	const struct tf_jfmt_params *p = &j->p;
	struct strh path, path2;
	size_t off = p->off_vfs_path;
	if (size < off || read_strh(j, d, size, &off, p->str_max, &path) ||
	    read_strh(j, d, size, &off, p->str_max, &path2) || off != size)
		return WHY_MALFORMED;
	const struct tf_jfmt_vfsop *op =
		v->scn && v->sc < MAX_SYSCALLS ? &j->vfsops[v->sc] : &NO_VFSOP;
	int why = walk_vpath(j, v, &j->keys[KEY_PATH], &path, d[p->off_vfs_path_kind]);
	if (why >= 0)
		return why;
	const struct tf_varg *pa = &v->args[v->nargs - 1];
	if (op->path2_key.len &&
	    (why = walk_vpath(j, v, &op->path2_key, &path2, d[p->off_vfs_path2_kind])) >= 0)
		return why;
	uint32_t dev = u32_at(d + p->off_vfs_dev);
	if (!dev && pa->shown && pa->vlen)
		return WHY_MOUNTS; /* the device is found from the path's directory */
	add_arg(v, TF_A_PLAIN_OPT, &j->keys[KEY_INODE])->v = (int64_t)u64_at(d + p->off_vfs_ino);
	add_arg(v, TF_A_PLAIN_DEV, &j->keys[KEY_DEV])->v = dev;
	struct tf_varg *a = add_arg(v, TF_A_PLAIN_TEXT, &j->keys[KEY_FSTYPE]);
	a->s.data = d + p->off_vfs_fstype;
	a->vlen = upto_nul(a->s.data, p->fstype_len);
	if (op->arg_key.len) {
		a = add_arg(v, TF_A_PLAIN, &op->arg_key);
		a->v = (int64_t)u64_at(d + p->off_vfs_arg);
		if (op->arg_flagtab >= 0 && op->arg_flagtab < MAX_FLAGTABS)
			a->flags = &j->flagtabs[op->arg_flagtab];
	}
	for (uint32_t i = 0; i < op->nplain && i < MAX_PLAIN; i++) {
		const uint8_t *f = d + op->plain_off[i];
		add_arg(v, TF_A_PLAIN, &op->plain_key[i])->v =
			op->plain_size[i] == 8 ? (int64_t)u64_at(f) : (int64_t)u32_at(f);
	}
	return -1;
}

/*
 * A record as decode.py reads it: -1 and the view, or why the emitters must leave it to
 * Python (WHY_MALFORMED: Python's decode raises RecordError; WHY_MOUNTS, WHY_NAME, WHY_SPEC:
 * Python needs what only it has). offset_ns: CLOCK_REALTIME - CLOCK_MONOTONIC.
 */
int tf_walk(struct tf_jfmt *j, const uint8_t *d, size_t size, uint64_t now, int64_t offset_ns,
	    struct tf_view *v)
{
	const struct tf_jfmt_params *p = &j->p;
	if (size < p->hdr_size)
		return WHY_MALFORMED;
	v->kind = u16_at(d + p->off_kind);
	v->set = d[p->off_set];
	v->sc = u16_at(d + p->off_syscall);
	v->setn = code_name(j->sets, MAX_SETS, v->set);
	v->scn = code_name(j->syscalls, MAX_SYSCALLS, v->sc);
	v->hstrat_code = d[p->off_strategy];
	v->hstrat = code_name(j->strategies, MAX_CODES, v->hstrat_code);
	uint64_t ts = u64_at(d + p->off_ts), exit_ns = u64_at(d + p->off_exit);
	v->ts = ts;
	v->wall = ts + (uint64_t)offset_ns;
	v->duration = exit_ns && exit_ns > ts ? exit_ns - ts : 0;
	v->latency = now > ts ? now - ts : 0;
	v->cgroup = u64_at(d + p->off_cgroup);
	v->ret = (int64_t)u64_at(d + p->off_ret);
	v->pid = u32_at(d + p->off_pid);
	v->tid = u32_at(d + p->off_tid);
	v->ctx = u32_at(d + p->off_ctx_ok) != 0;
	v->ppid = u32_at(d + p->off_ppid);
	v->uid = u32_at(d + p->off_uid);
	v->gid = u32_at(d + p->off_gid);
	v->comm = d + p->off_comm;
	v->clen = upto_nul(v->comm, p->comm_len);
	const struct tf_jfmt_spec *spec = NULL;
	if (v->setn && v->scn && v->set < MAX_SETS && v->sc < MAX_SYSCALLS &&
	    j->specs[v->set][v->sc].valid) {
		spec = &j->specs[v->set][v->sc];
		if (spec->valid != 1)
			return WHY_SPEC; /* a spec that did not fit the tables: Python's */
	}
	v->spec_ok = spec != NULL;
	v->nargs = 0;
	if (v->kind == p->kind_syscall)
		return walk_syscall(j, d, size, spec, v);
	if (v->kind == p->kind_exec)
		return walk_exec(j, d, size, spec, v);
	if (v->kind == p->kind_vfs)
		return walk_vfs(j, d, size, v);
	return WHY_MALFORMED; /* decode.py: unknown record kind */
}

int tf_walk_abi(void)
{
	return TF_WALK_ABI;
}

size_t tf_walk_view_size(void)
{
	return sizeof(struct tf_view);
}

/* the record's executable (after tf_walk accepted it) */
void tf_walk_exe(struct tf_jfmt *j, const uint8_t *d, struct exe_res *r)
{
	exe_resolve(j, d, r);
}

/* an emitter kept the record: its unknown exe is counted (exe.py's CAUSES) */
void tf_walk_kept(struct tf_jfmt *j, const struct exe_res *r)
{
	if (r->why >= 0 && r->why < EXE_WHY_MAX)
		j->exe_unknown[r->why]++;
}

/* ---- the JSON emitter: the jsonl line --------------------------------------------------- */

/* the tail every captured argument shares: status, strategy, addr, error */
static int put_arg_tail(struct lb *b, const struct tf_varg *a)
{
	if (!a->status || !a->strategy)
		return -1;
	PUTS(b, ",\"status\":");
	put_name(b, a->status);
	PUTS(b, ",\"strategy\":");
	put_name(b, a->strategy);
	PUTS(b, ",\"addr\":\"");
	put_hex(b, a->s.uptr);
	putc1(b, '"');
	if (a->s.err < 0) {
		PUTS(b, ",\"error\":");
		if (a->errn) {
			put_name(b, a->errn);
		} else {
			putc1(b, '"');
			put_i64(b, a->s.err);
			putc1(b, '"');
		}
	}
	putc1(b, '}');
	return 0;
}

static void put_flags(struct lb *b, const struct tf_jfmt_flagtab *t, uint64_t raw)
{
	const struct name *names[TF_MAX_FLAGBITS + 1];
	uint64_t rest;
	uint32_t n = tf_flag_names(t, raw, names, &rest);
	PUTS(b, ",\"names\":[");
	for (uint32_t i = 0; i < n; i++) {
		if (i)
			putc1(b, ',');
		put_name(b, names[i]);
	}
	if (rest) {
		if (n)
			putc1(b, ',');
		putc1(b, '"');
		put_hex(b, rest);
		putc1(b, '"');
	}
	putc1(b, ']');
}

static int make_line(struct tf_jfmt *j, const uint8_t *d, size_t size, uint64_t now,
		     struct lb *b, struct exe_res *exe)
{
	const struct tf_jfmt_params *p = &j->p;
	if (size < p->off_strings || u16_at(d + p->off_kind) != p->kind_syscall)
		return WHY_KIND;
	uint32_t set = d[p->off_set];
	uint32_t sc = u16_at(d + p->off_syscall);
	if (!code_name(j->sets, MAX_SETS, set) || !code_name(j->syscalls, MAX_SYSCALLS, sc) ||
	    !code_name(j->strategies, MAX_CODES, d[p->off_strategy]))
		return WHY_NAME;
	const struct tf_jfmt_spec *spec = &j->specs[set][sc];
	if (spec->valid != 1)
		return WHY_SPEC;
	if (spec->blob == TF_BLOB_SOCKADDR)
		return WHY_BLOB;
	struct tf_view v;
	int why = tf_walk(j, d, size, now, __atomic_load_n(&j->offset, __ATOMIC_RELAXED), &v);
	if (why >= 0)
		return why;
	for (uint32_t i = 0; i < v.nargs; i++)
		if (v.args[i].type == TF_A_BLOB && v.args[i].shown && v.args[i].s.len < 24)
			return WHY_BLOB; /* the model renders a short open_how as text of its own */
	uint32_t ioff = 0, ilen = 0;
	if (p->need_ident) {
		pthread_mutex_lock(&j->ident_lock);
		int found = ident_find(j, v.cgroup, &ioff, &ilen);
		pthread_mutex_unlock(&j->ident_lock);
		if (!found)
			return WHY_IDENT;
	}

	PUTS(b, "{\"ts_ns\":");
	put_u64(b, v.ts);
	PUTS(b, ",\"time\":");
	put_time(b, j, v.wall);
	PUTS(b, ",\"time_ns\":");
	put_u64(b, v.wall);
	PUTS(b, ",\"duration_ns\":");
	put_u64(b, v.duration);
	PUTS(b, ",\"delivery_latency_ns\":");
	put_u64(b, v.latency);
	PUTS(b, ",\"event_set\":");
	put_name(b, v.setn);
	PUTS(b, ",\"syscall\":");
	put_name(b, v.scn);
	PUTS(b, ",\"pid\":");
	put_u64(b, v.pid);
	PUTS(b, ",\"tid\":");
	put_u64(b, v.tid);
	const uint32_t ctx_v[3] = {v.ppid, v.uid, v.gid};
	static const char *const ctx_key[3] = {",\"ppid\":", ",\"uid\":", ",\"gid\":"};
	for (int i = 0; i < 3; i++) {
		put(b, ctx_key[i], strlen(ctx_key[i]));
		if (v.ctx)
			put_u64(b, ctx_v[i]);
		else
			PUTS(b, "null");
	}
	PUTS(b, ",\"exe\":");
	exe_resolve(j, d, exe);
	if (exe->why < 0)
		put_jstr(b, exe->s, exe->len);
	else
		PUTS(b, "null");
	PUTS(b, ",\"comm\":");
	put_jstr(b, v.comm, v.clen);
	PUTS(b, ",\"ret\":");
	put_i64(b, v.ret);
	PUTS(b, ",\"cgroup_id\":");
	put_u64(b, v.cgroup);
	PUTS(b, ",\"strategy\":");
	put_name(b, v.hstrat);
	if (ilen)
		put(b, j->ident_pool + ioff, ilen);
	PUTS(b, ",\"args\":{");
	for (uint32_t i = 0; i < v.nargs; i++) {
		const struct tf_varg *a = &v.args[i];
		if (i)
			putc1(b, ',');
		put_name(b, a->key);
		PUTS(b, ":{\"value\":");
		switch (a->type) {
		case TF_A_INT:
			put_i64(b, a->v);
			PUTS(b, ",\"status\":\"ok\",\"strategy\":\"register\"");
			if (a->flags)
				put_flags(b, a->flags, (uint64_t)a->v);
			putc1(b, '}');
			break;
		case TF_A_STR:
			if (a->shown)
				put_jstr(b, a->s.data, a->vlen);
			else
				PUTS(b, "null");
			if (put_arg_tail(b, a))
				return WHY_NAME;
			break;
		case TF_A_BLOB: /* open_how: sockaddr was declined above */
			if (a->shown) {
				PUTS(b, "{\"flags\":");
				put_u64(b, u64_at(a->s.data));
				PUTS(b, ",\"mode\":");
				put_u64(b, u64_at(a->s.data + 8));
				PUTS(b, ",\"resolve\":");
				put_u64(b, u64_at(a->s.data + 16));
				putc1(b, '}');
			} else {
				PUTS(b, "null");
			}
			if (put_arg_tail(b, a))
				return WHY_NAME;
			break;
		default:
			return WHY_KIND; /* not in a syscall record */
		}
	}
	PUTS(b, "}}\n");
	return b->over ? WHY_SPACE : -1;
}

int tf_jfmt_record(struct tf_jfmt *j, const uint8_t *d, size_t size, uint64_t now_ns)
{
	if (j->werr || !j->out) {
		j->declined[WHY_OUTPUT]++;
		return 0;
	}
	if (j->out_cap - j->out_len < LINE_MAX_BYTES && flush_out(j) < 0) {
		j->declined[WHY_OUTPUT]++;
		return 0;
	}
	struct lb b = {j->out + j->out_len, j->out + j->out_cap, 0};
	struct exe_res exe = {NULL, 0, -1};
	if (b.end - b.p > LINE_MAX_BYTES)
		b.end = b.p + LINE_MAX_BYTES;
	int why = make_line(j, d, size, now_ns, &b, &exe);
	if (why >= 0) {
		j->declined[why]++; /* and an unknown exe is Python's to count */
		return 0;
	}
	if (exe.why >= 0)
		j->exe_unknown[exe.why]++;
	j->out_len = (size_t)(b.p - j->out);
	j->written++;
	return 1;
}

/* ---- set up from Python ---------------------------------------------------------------- */

int tf_jfmt_abi(void)
{
	return TF_JFMT_ABI;
}

/* the sizes of the structs Python fills (jsonfmt.py checks its mirrors against them) */
size_t tf_jfmt_sizeof(uint32_t which)
{
	switch (which) {
	case 0: return sizeof(struct tf_jfmt_params);
	case 1: return sizeof(struct tf_jfmt_spec);
	case 2: return sizeof(struct tf_jfmt_vfsop);
	case 3: return sizeof(struct tf_jfmt_flagtab);
	default: return 0;
	}
}

struct tf_jfmt *tf_jfmt_new(const struct tf_jfmt_params *p)
{
	if (p->abi != TF_JFMT_ABI || (p->fd >= 0 && p->out_bytes < 4 * LINE_MAX_BYTES) ||
	    p->off_strings < p->off_iargs + 48 || p->off_iargs < p->hdr_size || p->strh_size < 16 ||
	    p->off_comm + p->comm_len > p->hdr_size ||
	    p->off_exec_filename < p->off_iargs + 48 || p->argvh_size < 16 ||
	    p->argvh_uptr_off + 8 > p->argvh_size || p->argvh_err_off + 4 > p->argvh_size ||
	    p->argvh_argc_off + 2 > p->argvh_size || p->argvh_status_off >= p->argvh_size ||
	    p->argvh_strategy_off >= p->argvh_size || p->off_vfs_ino + 8 > p->off_vfs_path ||
	    p->off_vfs_arg + 8 > p->off_vfs_path || p->off_vfs_dev + 4 > p->off_vfs_path ||
	    p->off_vfs_path_kind >= p->off_vfs_path || p->off_vfs_path2_kind >= p->off_vfs_path ||
	    p->off_vfs_fstype + p->fstype_len > p->off_vfs_path || p->off_vfs_path < p->hdr_size ||
	    p->exe_value_size > EXE_VALUE_MAX || p->exe_value_size < p->strh_size + p->str_max ||
	    p->exe_key_size > EXE_KEY_MAX || p->exe_key_ino_off + 8 > p->exe_key_size ||
	    p->exe_key_dev_off + 4 > p->exe_key_size || p->exe_key_gen_off + 4 > p->exe_key_size ||
	    p->off_exe_ino + 8 > p->hdr_size || p->off_exe_dev + 4 > p->hdr_size ||
	    p->off_exe_gen + 4 > p->hdr_size) {
		errno = EINVAL;
		return NULL;
	}
	struct tf_jfmt *j = calloc(1, sizeof(*j));
	if (!j)
		return NULL;
	j->p = *p;
	j->out_cap = p->fd >= 0 ? p->out_bytes : 0;
	j->out = p->fd >= 0 ? malloc(j->out_cap) : NULL; /* fd < 0: the walker's tables only */
	if (p->fd >= 0 && !j->out) {
		free(j);
		errno = ENOMEM;
		return NULL;
	}
	pthread_mutex_init(&j->ident_lock, NULL);
	for (uint32_t s = 0; s < MAX_SETS; s++)
		for (uint32_t c = 0; c < MAX_SYSCALLS; c++)
			for (uint32_t i = 0; i < MAX_INTS; i++)
				j->specs[s][c].flagtab[i] = -1;
	for (uint32_t c = 0; c < MAX_SYSCALLS; c++)
		j->vfsops[c].arg_flagtab = -1;
	return j;
}

void tf_jfmt_free(struct tf_jfmt *j)
{
	if (!j)
		return;
	pthread_mutex_destroy(&j->ident_lock);
	free(j->out);
	free(j);
}

enum { TAB_SET = 0, TAB_SYSCALL, TAB_STATUS, TAB_STRATEGY, TAB_ERRNO, TAB_PATHKIND, TAB_KEY };

static int set_name(struct name *n, const char *s)
{
	size_t len = strlen(s);
	if (len >= NAME_MAX_LEN)
		return -ENAMETOOLONG;
	memcpy(n->s, s, len);
	n->len = (uint8_t)len;
	return 0;
}

/* one entry of a name table; json is the JSON-encoded name (quotes included) */
int tf_jfmt_name(struct tf_jfmt *j, uint32_t table, uint32_t code, const char *json)
{
	struct name *tab;
	uint32_t n;
	switch (table) {
	case TAB_SET: tab = j->sets; n = MAX_SETS; break;
	case TAB_SYSCALL: tab = j->syscalls; n = MAX_SYSCALLS; break;
	case TAB_STATUS: tab = j->statuses; n = MAX_CODES; break;
	case TAB_STRATEGY: tab = j->strategies; n = MAX_CODES; break;
	case TAB_ERRNO: tab = j->errnos; n = MAX_ERRNO; break;
	case TAB_PATHKIND: tab = j->pathkinds; n = MAX_CODES; break;
	case TAB_KEY: tab = j->keys; n = KEY_MAX; break;
	default: return -EINVAL;
	}
	if (code >= n)
		return -ERANGE;
	return set_name(&tab[code], json);
}

/* one set's syscall: its argument spec (s->valid 1), or valid 2: a spec that does not fit
 * these tables (its records stay Python's) */
int tf_jfmt_spec(struct tf_jfmt *j, uint32_t set, uint32_t sc, const struct tf_jfmt_spec *s)
{
	if (set >= MAX_SETS || sc >= MAX_SYSCALLS || s->nints > MAX_INTS || s->nstrs > MAX_STRS ||
	    s->blob > 2 || (s->valid != 1 && s->valid != 2))
		return -ERANGE;
	for (uint32_t i = 0; i < s->nints; i++)
		if (s->int_idx[i] >= 6 || s->flagtab[i] >= MAX_FLAGTABS)
			return -ERANGE;
	j->specs[set][sc] = *s;
	return 0;
}

/* a vfs operation's extra arguments, by syscall code */
int tf_jfmt_vfsop(struct tf_jfmt *j, uint32_t sc, const struct tf_jfmt_vfsop *op)
{
	if (sc >= MAX_SYSCALLS || op->nplain > MAX_PLAIN || op->arg_flagtab >= MAX_FLAGTABS)
		return -ERANGE;
	for (uint32_t i = 0; i < op->nplain; i++)
		if ((op->plain_size[i] != 4 && op->plain_size[i] != 8) ||
		    op->plain_off[i] + op->plain_size[i] > j->p.off_vfs_path)
			return -ERANGE;
	j->vfsops[sc] = *op;
	return 0;
}

int tf_jfmt_flagtab(struct tf_jfmt *j, uint32_t id, const struct tf_jfmt_flagtab *t)
{
	if (id >= MAX_FLAGTABS || t->nbits > MAX_FLAGBITS)
		return -ERANGE;
	j->flagtabs[id] = *t;
	return 0;
}

void tf_jfmt_offset(struct tf_jfmt *j, int64_t offset_ns)
{
	__atomic_store_n(&j->offset, offset_ns, __ATOMIC_RELAXED);
}

/* a cgroup's workload fields, settled: the JSON text (leading commas included) that follows
 * "strategy" on its lines. -ENOSPC when the table is full (its records stay Python's). */
int tf_jfmt_ident(struct tf_jfmt *j, uint64_t cg, const char *frag, uint32_t len)
{
	int ret = 0;
	pthread_mutex_lock(&j->ident_lock);
	uint32_t h = (uint32_t)((cg * 0x9E3779B97F4A7C15ull) >> 52) & (IDENT_SLOTS - 1);
	struct ident *slot = NULL;
	for (uint32_t n = 0; n < IDENT_SLOTS; n++) {
		struct ident *e = &j->idents[(h + n) & (IDENT_SLOTS - 1)];
		if (!e->used || e->cgroup == cg) {
			slot = e;
			break;
		}
	}
	if (!slot || (!slot->used && j->nidents >= IDENT_SLOTS / 2) ||
	    j->pool_used + len > IDENT_POOL) {
		ret = -ENOSPC;
	} else {
		memcpy(j->ident_pool + j->pool_used, frag, len);
		if (!slot->used)
			j->nidents++;
		slot->cgroup = cg;
		slot->off = j->pool_used;
		slot->len = len;
		slot->used = 1;
		j->pool_used += len;
	}
	pthread_mutex_unlock(&j->ident_lock);
	return ret;
}

/* forget every cgroup (the workload resolver refreshed) */
void tf_jfmt_ident_clear(struct tf_jfmt *j)
{
	pthread_mutex_lock(&j->ident_lock);
	memset(j->idents, 0, sizeof(j->idents));
	j->nidents = 0;
	j->pool_used = 0;
	pthread_mutex_unlock(&j->ident_lock);
}

/* a line Python made (declined records): into the same buffer, so lines never interleave */
int tf_jfmt_write(struct tf_jfmt *j, const char *line, size_t len)
{
	if (j->werr)
		return -j->werr;
	if (j->out_cap - j->out_len < len && flush_out(j) < 0)
		return -j->werr;
	if (len > j->out_cap - j->out_len) { /* longer than the buffer: straight out */
		size_t done = 0;
		while (done < len) {
			ssize_t w = write(j->p.fd, line + done, len - done);
			if (w < 0) {
				if (errno == EINTR)
					continue;
				j->werr = errno;
				return -j->werr;
			}
			done += (size_t)w;
		}
		j->bytes_out += done;
		return 0;
	}
	memcpy(j->out + j->out_len, line, len);
	j->out_len += len;
	return 0;
}

int tf_jfmt_flush(struct tf_jfmt *j)
{
	return flush_out(j);
}

/* For tests: the line of one record into out (cap bytes), not into the output buffer.
 * Returns its length, or -(1 + reason) when Python must make it. */
long tf_jfmt_line(struct tf_jfmt *j, const uint8_t *d, size_t size, uint64_t now_ns, char *out,
		  size_t cap)
{
	struct lb b = {out, out + cap, 0};
	struct exe_res exe = {NULL, 0, -1};
	int why = make_line(j, d, size, now_ns, &b, &exe);
	if (why >= 0)
		return -(1 + why);
	if (exe.why >= 0)
		j->exe_unknown[exe.why]++;
	return (long)(b.p - out);
}

/* counters: [0] lines written by this code, [1] bytes written to the fd, [2] write error
 * (errno), [3..3+WHY_MAX) records declined per reason */
void tf_jfmt_counters(const struct tf_jfmt *j, uint64_t *out)
{
	out[0] = j->written;
	out[1] = j->bytes_out;
	out[2] = (uint64_t)j->werr;
	for (int i = 0; i < WHY_MAX; i++)
		out[3 + i] = j->declined[i];
}

/* An executable's path, cached as if read from tf_exes (the self-check and tests, before the
 * formatter runs: the cache is the polling thread's) */
int tf_jfmt_exe_seed(struct tf_jfmt *j, uint64_t ino, uint32_t dev, uint32_t gen,
		     const char *path, uint32_t len)
{
	if (!ino || len > j->p.str_max)
		return -ERANGE;
	return exe_put(j, ino, dev, gen, (const uint8_t *)path, len) ? 0 : -ENOSPC;
}

/* forget every cached executable and the counts (after the self-check) */
void tf_jfmt_exe_reset(struct tf_jfmt *j)
{
	exe_clear(j);
	memset(j->exe_unknown, 0, sizeof(j->exe_unknown));
	j->exe_lookups = 0;
}

/* [0..EXE_WHY_MAX) lines of an unknown exe per cause (exe.py's CAUSES order), then the
 * tf_exes lookups made (cache misses) */
void tf_jfmt_exe_counters(const struct tf_jfmt *j, uint64_t *out)
{
	for (int i = 0; i < EXE_WHY_MAX; i++)
		out[i] = j->exe_unknown[i];
	out[EXE_WHY_MAX] = j->exe_lookups;
}
