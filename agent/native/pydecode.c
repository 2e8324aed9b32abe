// SPDX-License-Identifier: Apache-2.0
/*
 * tracefleet compiled decode: the _tfdecode CPython extension (built by `make native` against
 * the interpreter's headers into the agent package, beside libtfring.so; no compiler at run
 * time). Wrapped by tracefleet/agent/capture/cdecode.py.
 *
 * The Python emitter of the record walker (walk.h): jsonfmt.c in libtfring.so reads a record
 * into a view (its fields and arguments, which values are shown, which names apply) with the
 * tables Python handed over; this code spells the view as the dict decode.py's decode_record
 * makes (same keys in the same order, same values, same types), the executable resolved as
 * exe.py does. A whole batch of the compiled ring consumer (fastring.c) is decoded in one
 * call: the dicts are returned in ring order, and each record this code leaves to Python (an
 * unknown id, a lost argument for the user-space fallback, a record the walker declines:
 * malformed, needs the mount table, ...) is returned in its place as (raw, receive time,
 * flags) for RingConsumer.on_record, its reason counted.
 *
 * The walker is called through the addresses Python hands over from the loaded libtfring.so
 * (one copy of it in the process), checked against TF_WALK_ABI and the view's size.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "rdbytes.h"
#include "walk.h"

#define NAME_SLOTS 8192 /* power of two: the name objects, by the address of their name */

/* why a record is left to Python beyond the walker's reasons (walk.h's WHY_*) */
enum { DEC_RAW = WHY_MAX, DEC_FALLBACK, DEC_NOMEM, DEC_MAX };

/* the text of the last bytes seen at one place of the event (comm, exe, a path): a record
 * like the one before (the same process, the same file) reuses the str, immutable, instead
 * of decoding and allocating it again */
#define TCACHE_MAX 256
enum { TC_COMM = 0, TC_EXE, TC_STR0, TC_STR1, TC_MAX };

struct tcache {
	uint32_t len;
	uint8_t b[TCACHE_MAX];
	PyObject *o;
};

/* the int of the last value seen at one place of the event (pid, tid, cgroup, an argument
 * register): records of one process repeat them; an int is immutable, shared like a str */
enum { IC_PID = 0, IC_TID, IC_CGROUP, IC_PPID, IC_UID, IC_GID, IC_RET, IC_ARG0, IC_MAX = IC_ARG0 + 6 };

struct icache {
	uint64_t v;
	int neg; /* the value is an int64 (signed) */
	PyObject *o;
};

struct name_slot {
	const struct name *k;
	PyObject *v;
};

typedef struct {
	PyObject_HEAD
	struct tf_jfmt *j;
	struct tf_fast *f; /* NULL: records are not counted (tests) */
	tf_walk_fn walk;
	tf_walk_exe_fn exe;
	tf_walk_kept_fn kept;
	tf_fast_count_fn count;
	uint32_t af_inet, af_inet6, af_unix;
	PyObject *owner; /* what keeps j and f alive (the Python objects that own them) */
	struct name_slot *names;
	struct tcache tc[TC_MAX];
	struct icache ic[IC_MAX];
	uint64_t last_uptr;
	PyObject *last_hex;
	uint64_t decoded, counted;
	uint64_t declined[DEC_MAX];
} Decoder;

/* dicts of a fixed key order, copied then filled (a copy clones the keys table in one
 * allocation; replacing a value is cheaper than inserting a key): the event, an integer
 * argument, a captured string argument */
static PyObject *T_event, *T_int, *T_str;

/* keys and fixed values, interned once */
static PyObject *K_ts_ns, *K_time_ns, *K_duration_ns, *K_delivery_latency_ns, *K_event_set,
	*K_syscall, *K_pid, *K_tid, *K_comm, *K_ret, *K_cgroup_id, *K_strategy, *K_ppid, *K_uid,
	*K_gid, *K_exe, *K_args, *K_value, *K_status, *K_addr, *K_error, *K_names, *K_kind,
	*K_flags, *K_mode, *K_resolve, *K_raw, *K_family, *K_address, *K_port, *K_path,
	*V_ok, *V_register, *V_kernel, *V_short, *V_inet, *V_inet6, *V_unix, *V_empty;

/* ---- names ------------------------------------------------------------------------------ */

/* The str of a name handed over JSON-encoded (quotes included): borrowed, cached by the
 * name's address (the tables do not change once decoding starts). NULL without an exception:
 * a name this code does not unescape (never, for the identifiers handed over). */
static PyObject *pyname(Decoder *self, const struct name *n)
{
	uintptr_t h = ((uintptr_t)n >> 3) * 0x9E3779B97F4A7C15ull;
	for (uint32_t i = 0; i < NAME_SLOTS; i++) {
		struct name_slot *s = &self->names[(h + i) & (NAME_SLOTS - 1)];
		if (s->k == n)
			return s->v;
		if (!s->k) {
			if (n->len < 2 || n->s[0] != '"' || n->s[n->len - 1] != '"' ||
			    memchr(n->s, '\\', n->len))
				return NULL;
			PyObject *o = PyUnicode_DecodeUTF8(n->s + 1, n->len - 2, "strict");
			if (!o) {
				PyErr_Clear();
				return NULL;
			}
			PyUnicode_InternInPlace(&o);
			s->k = n;
			s->v = o;
			return o;
		}
	}
	return NULL;
}

/* ---- values ----------------------------------------------------------------------------- */

static PyObject *text(const uint8_t *s, uint32_t n)
{
	return PyUnicode_DecodeUTF8((const char *)s, n, "backslashreplace");
}

/* text(), through one place's cache (a new reference) */
static PyObject *ctext(struct tcache *c, const uint8_t *s, uint32_t n)
{
	if (c->o && c->len == n && !memcmp(c->b, s, n)) {
		Py_INCREF(c->o);
		return c->o;
	}
	PyObject *o = text(s, n);
	if (o && n <= TCACHE_MAX) {
		Py_XSETREF(c->o, o);
		Py_INCREF(o);
		c->len = n;
		memcpy(c->b, s, n);
	}
	return o;
}

/* PyLong_From(Unsigned)LongLong through one place's cache (a new reference) */
static PyObject *cint(struct icache *c, uint64_t v, int sign)
{
	if (c->o && c->v == v && c->neg == sign) {
		Py_INCREF(c->o);
		return c->o;
	}
	PyObject *o = sign ? PyLong_FromLongLong((int64_t)v) : PyLong_FromUnsignedLongLong(v);
	if (o) {
		Py_XSETREF(c->o, o);
		Py_INCREF(o);
		c->v = v;
		c->neg = sign;
	}
	return o;
}

static PyObject *hexstr(uint64_t v) /* Python's hex() */
{
	static const char HEX[] = "0123456789abcdef";
	char t[18];
	int i = sizeof(t);
	do {
		t[--i] = HEX[v & 15];
		v >>= 4;
	} while (v);
	t[--i] = 'x';
	t[--i] = '0';
	PyObject *o = PyUnicode_New((Py_ssize_t)sizeof(t) - i, 127);
	if (o)
		memcpy(PyUnicode_DATA(o), t + i, sizeof(t) - (size_t)i);
	return o;
}

static PyObject *hexbytes(const uint8_t *s, uint32_t n) /* bytes.hex() */
{
	static const char HEX[] = "0123456789abcdef";
	PyObject *o = PyUnicode_New((Py_ssize_t)n * 2, 127);
	if (!o)
		return NULL;
	char *p = (char *)PyUnicode_DATA(o);
	for (uint32_t i = 0; i < n; i++) {
		p[2 * i] = HEX[s[i] >> 4];
		p[2 * i + 1] = HEX[s[i] & 15];
	}
	return o;
}

/* decode.py's _status / _strategy: the label, or unknown(N) */
static PyObject *label(Decoder *self, const struct name *n, uint32_t code)
{
	if (n) {
		PyObject *o = pyname(self, n);
		if (o) {
			Py_INCREF(o);
			return o;
		}
	}
	return PyUnicode_FromFormat("unknown(%u)", code);
}

/* a name, or the number as text (an unknown set or syscall: str(code)) */
static PyObject *name_or_num(Decoder *self, const struct name *n, long long code)
{
	if (n) {
		PyObject *o = pyname(self, n);
		if (o) {
			Py_INCREF(o);
			return o;
		}
	}
	return PyUnicode_FromFormat("%lld", code);
}

/* set d[k] = v, v a new reference (consumed); -1 on failure */
static inline int put_new(PyObject *d, PyObject *k, PyObject *v)
{
	if (!v)
		return -1;
	int rc = PyDict_SetItem(d, k, v);
	Py_DECREF(v);
	return rc;
}

#define PUT(d, k, v)                                                                           \
	do {                                                                                   \
		if (put_new((d), (k), (v)) < 0)                                                \
			goto fail;                                                             \
	} while (0)
#define PUTB(d, k, v) /* v borrowed */                                                         \
	do {                                                                                   \
		if (PyDict_SetItem((d), (k), (v)) < 0)                                         \
			goto fail;                                                             \
	} while (0)

/* model.FlagTable.names: a new list */
static PyObject *flag_list(Decoder *self, const struct tf_jfmt_flagtab *t, uint64_t raw)
{
	const struct name *names[TF_MAX_FLAGBITS + 1];
	uint64_t rest;
	uint32_t n = tf_flag_names(t, raw, names, &rest);
	PyObject *l = PyList_New(n + (rest ? 1 : 0));
	if (!l)
		return NULL;
	for (uint32_t i = 0; i < n; i++) {
		PyObject *o = pyname(self, names[i]);
		if (!o) {
			Py_DECREF(l);
			return PyErr_Format(PyExc_ValueError, "flag name without a str");
		}
		Py_INCREF(o);
		PyList_SET_ITEM(l, i, o);
	}
	if (rest) {
		PyObject *o = hexstr(rest);
		if (!o) {
			Py_DECREF(l);
			return NULL;
		}
		PyList_SET_ITEM(l, n, o);
	}
	return l;
}

/* decode.py's decode_open_how */
static PyObject *open_how(const uint8_t *s, uint32_t n)
{
	PyObject *d = PyDict_New();
	if (!d)
		return NULL;
	if (n < 24) {
		PUT(d, K_raw, hexbytes(s, n));
		return d;
	}
	PUT(d, K_flags, PyLong_FromUnsignedLongLong(u64_at(s)));
	PUT(d, K_mode, PyLong_FromUnsignedLongLong(u64_at(s + 8)));
	PUT(d, K_resolve, PyLong_FromUnsignedLongLong(u64_at(s + 16)));
	return d;
fail:
	Py_DECREF(d);
	return NULL;
}

/* str(ipaddress.IPv6Address(b)): hextets in hex, the longest run (first of equals) of two or
 * more zero hextets written as :: (ipaddress._compress_hextets) */
static PyObject *ipv6_text(const uint8_t *b)
{
	uint32_t h[8];
	int best = -1, best_len = 0, cur = -1, cur_len = 0;
	for (int i = 0; i < 8; i++) {
		h[i] = (uint32_t)b[2 * i] << 8 | b[2 * i + 1];
		if (!h[i]) {
			if (cur < 0)
				cur = i;
			if (++cur_len > best_len) {
				best_len = cur_len;
				best = cur;
			}
		} else {
			cur = -1;
			cur_len = 0;
		}
	}
	char t[48];
	size_t n = 0;
	for (int i = 0; i < 8;) {
		if (best_len > 1 && i == best) {
			t[n++] = ':';
			if (i == 0)
				t[n++] = ':';
			i += best_len;
			continue;
		}
		n += (size_t)snprintf(t + n, sizeof(t) - n, "%x", h[i]);
		if (++i < 8)
			t[n++] = ':';
	}
	return PyUnicode_FromStringAndSize(t, (Py_ssize_t)n);
}

/* decode.py's decode_sockaddr */
static PyObject *sockaddr(Decoder *self, const uint8_t *s, uint32_t n)
{
	PyObject *d = PyDict_New();
	if (!d)
		return NULL;
	if (n < 2) {
		PUTB(d, K_family, V_short);
		PUT(d, K_raw, hexbytes(s, n));
		return d;
	}
	uint32_t family = u16_at(s);
	uint32_t port = n >= 4 ? (uint32_t)s[2] << 8 | s[3] : 0; /* read only when n >= 8 */
	if (family == self->af_inet && n >= 8) {
		PUTB(d, K_family, V_inet);
		PUT(d, K_address, PyUnicode_FromFormat("%u.%u.%u.%u", s[4], s[5], s[6], s[7]));
		PUT(d, K_port, PyLong_FromUnsignedLong(port));
		return d;
	}
	if (family == self->af_inet6 && n >= 24) {
		PUTB(d, K_family, V_inet6);
		PUT(d, K_address, ipv6_text(s + 8));
		PUT(d, K_port, PyLong_FromUnsignedLong(port));
		return d;
	}
	if (family == self->af_unix) {
		PUTB(d, K_family, V_unix);
		const uint8_t *p = s + 2;
		uint32_t len = n - 2;
		if (len && p[0] == 0) { /* abstract: "@" + the name, trailing NULs stripped */
			uint32_t e = len;
			while (e > 1 && p[e - 1] == 0)
				e--;
			PyObject *name = text(p + 1, e - 1);
			if (!name)
				goto fail;
			PUT(d, K_path, PyUnicode_FromFormat("@%U", name));
			Py_DECREF(name);
			return d;
		}
		const uint8_t *z = memchr(p, 0, len);
		PUT(d, K_path, text(p, z ? (uint32_t)(z - p) : len));
		return d;
	}
	PUT(d, K_family, PyUnicode_FromFormat("%u", family));
	PUT(d, K_raw, hexbytes(s, n));
	return d;
fail:
	Py_DECREF(d);
	return NULL;
}

/* the tail of a captured argument: status, strategy, [addr], [error] */
static int put_tail(Decoder *self, PyObject *d, const struct tf_varg *a, int addr)
{
	PUT(d, K_status, label(self, a->status, a->s.status));
	PUT(d, K_strategy, label(self, a->strategy, a->s.strategy));
	if (addr) {
		if (!self->last_hex || self->last_uptr != a->s.uptr) {
			PyObject *h = hexstr(a->s.uptr);
			if (!h)
				goto fail;
			Py_XSETREF(self->last_hex, h);
			self->last_uptr = a->s.uptr;
		}
		PUTB(d, K_addr, self->last_hex);
	}
	if (a->s.err) {
		if (a->s.err > 0) {
			PUTB(d, K_error, V_empty); /* decode.py's _err: "" for a value >= 0 */
		} else {
			PyObject *e = a->errn ? pyname(self, a->errn) : NULL;
			if (e)
				PUTB(d, K_error, e);
			else
				PUT(d, K_error, PyUnicode_FromFormat("%d", (int)a->s.err));
		}
	}
	return 0;
fail:
	return -1;
}

static PyObject *argv_list(const struct tf_varg *a)
{
	PyObject *l = PyList_New(a->vlen);
	if (!l)
		return NULL;
	const uint8_t *p = a->s.data;
	for (uint32_t i = 0; i < a->vlen; i++) {
		uint32_t n = u16_at(p);
		PyObject *o = text(p + 2, n); /* the whole argument: NULs included */
		if (!o) {
			Py_DECREF(l);
			return NULL;
		}
		PyList_SET_ITEM(l, i, o);
		p += 2 + n;
	}
	return l;
}

static PyObject *plain(PyObject *value) /* decode.py's _plain; value consumed */
{
	if (!value)
		return NULL;
	PyObject *d = _PyDict_NewPresized(3);
	if (!d) {
		Py_DECREF(value);
		return NULL;
	}
	PUT(d, K_value, value);
	PUTB(d, K_status, V_ok);
	PUTB(d, K_strategy, V_kernel);
	return d;
fail:
	Py_DECREF(d);
	return NULL;
}

static PyObject *arg_obj(Decoder *self, const struct tf_varg *a, struct tcache *tc,
			 struct icache *ic)
{
	PyObject *d = NULL;
	switch (a->type) {
	case TF_A_INT:
		d = PyDict_Copy(T_int);
		if (!d)
			return NULL;
		/* status "ok", strategy "register": the template's */
		PUT(d, K_value, ic ? cint(ic, (uint64_t)a->v, 1) : PyLong_FromLongLong(a->v));
		if (a->flags)
			PUT(d, K_names, flag_list(self, a->flags, (uint64_t)a->v));
		return d;
	case TF_A_STR:
	case TF_A_VPATH:
		d = a->type == TF_A_STR ? PyDict_Copy(T_str) : _PyDict_NewPresized(6);
		if (!d)
			return NULL;
		if (a->shown)
			PUT(d, K_value, tc ? ctext(tc, a->s.data, a->vlen) : text(a->s.data, a->vlen));
		else
			PUTB(d, K_value, Py_None);
		if (put_tail(self, d, a, a->type == TF_A_STR) < 0)
			goto fail;
		if (a->type == TF_A_VPATH)
			PUTB(d, K_kind, pyname(self, a->kind) ? pyname(self, a->kind) : Py_None);
		return d;
	case TF_A_BLOB:
	case TF_A_ARGV:
		d = _PyDict_NewPresized(5);
		if (!d)
			return NULL;
		if (!a->shown)
			PUTB(d, K_value, Py_None);
		else if (a->type == TF_A_ARGV)
			PUT(d, K_value, argv_list(a));
		else if (a->blob == TF_BLOB_SOCKADDR)
			PUT(d, K_value, sockaddr(self, a->s.data, a->vlen));
		else
			PUT(d, K_value, open_how(a->s.data, a->vlen));
		if (put_tail(self, d, a, 1) < 0)
			goto fail;
		return d;
	case TF_A_PLAIN:
		d = plain(PyLong_FromUnsignedLongLong((uint64_t)a->v));
		if (d && a->flags)
			PUT(d, K_names, flag_list(self, a->flags, (uint64_t)a->v));
		return d;
	case TF_A_PLAIN_OPT:
		if (!a->v) {
			Py_INCREF(Py_None);
			return plain(Py_None);
		}
		return plain(PyLong_FromUnsignedLongLong((uint64_t)a->v));
	case TF_A_PLAIN_DEV: {
		uint32_t dev = (uint32_t)a->v;
		return plain(PyUnicode_FromFormat("%u:%u", dev >> 20, dev & 0xFFFFF));
	}
	case TF_A_PLAIN_TEXT:
		return plain(text(a->s.data, a->vlen));
	}
	return PyErr_Format(PyExc_ValueError, "argument type %u", a->type);
fail:
	Py_XDECREF(d);
	return NULL;
}

/* The event dict of a walked record (decode.py's decode_struct, exe as ExeResolver.path);
 * NULL with an exception on failure. */
static PyObject *event(Decoder *self, const struct tf_view *v, const struct exe_res *exe)
{
	PyObject *ev = PyDict_Copy(T_event), *args = NULL;
	if (!ev)
		return NULL;
	PUT(ev, K_ts_ns, PyLong_FromUnsignedLongLong(v->ts));
	PUT(ev, K_time_ns, PyLong_FromUnsignedLongLong(v->wall));
	PUT(ev, K_duration_ns, PyLong_FromUnsignedLongLong(v->duration));
	PUT(ev, K_delivery_latency_ns, PyLong_FromUnsignedLongLong(v->latency));
	PUT(ev, K_event_set, name_or_num(self, v->setn, v->set));
	PUT(ev, K_syscall, name_or_num(self, v->scn, v->sc));
	PUT(ev, K_pid, cint(&self->ic[IC_PID], v->pid, 0));
	PUT(ev, K_tid, cint(&self->ic[IC_TID], v->tid, 0));
	PUT(ev, K_comm, ctext(&self->tc[TC_COMM], v->comm, v->clen));
	PUT(ev, K_ret, cint(&self->ic[IC_RET], (uint64_t)v->ret, 1));
	PUT(ev, K_cgroup_id, cint(&self->ic[IC_CGROUP], v->cgroup, 0));
	PUT(ev, K_strategy, label(self, v->hstrat, v->hstrat_code));
	if (v->ctx) {
		PUT(ev, K_ppid, cint(&self->ic[IC_PPID], v->ppid, 0));
		PUT(ev, K_uid, cint(&self->ic[IC_UID], v->uid, 0));
		PUT(ev, K_gid, cint(&self->ic[IC_GID], v->gid, 0));
	} else {
		PUTB(ev, K_ppid, Py_None);
		PUTB(ev, K_uid, Py_None);
		PUTB(ev, K_gid, Py_None);
	}
	if (exe && exe->why < 0)
		PUT(ev, K_exe, ctext(&self->tc[TC_EXE], exe->s, exe->len));
	else
		PUTB(ev, K_exe, Py_None);
	args = _PyDict_NewPresized(v->nargs);
	if (!args)
		goto fail;
	int nstr = 0;
	for (uint32_t i = 0; i < v->nargs; i++) {
		const struct tf_varg *a = &v->args[i];
		PyObject *k = pyname(self, a->key);
		if (!k) {
			PyErr_SetString(PyExc_ValueError, "argument key without a str");
			goto fail;
		}
		struct tcache *tc = NULL;
		if ((a->type == TF_A_STR || a->type == TF_A_VPATH) && nstr < 2)
			tc = &self->tc[TC_STR0 + nstr++];
		PUT(args, k, arg_obj(self, a, tc, i < 6 ? &self->ic[IC_ARG0 + i] : NULL));
	}
	PyObject *a = args;
	args = NULL;
	PUT(ev, K_args, a);
	return ev;
fail:
	Py_XDECREF(args);
	Py_DECREF(ev);
	return NULL;
}

/* ---- the type --------------------------------------------------------------------------- */

static void Decoder_dealloc(Decoder *self)
{
	if (self->names) {
		for (uint32_t i = 0; i < NAME_SLOTS; i++)
			Py_XDECREF(self->names[i].v);
		PyMem_Free(self->names);
	}
	for (int i = 0; i < TC_MAX; i++)
		Py_XDECREF(self->tc[i].o);
	for (int i = 0; i < IC_MAX; i++)
		Py_XDECREF(self->ic[i].o);
	Py_XDECREF(self->last_hex);
	Py_XDECREF(self->owner);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

static void *as_ptr(PyObject *o)
{
	return o == Py_None ? NULL : PyLong_AsVoidPtr(o);
}

/* Decoder(fns, jfmt, fast, families, owner): fns = (walk_abi, view_size, tf_walk,
 * tf_walk_exe, tf_walk_kept, tf_fast_count) from libtfring.so; jfmt the walker's tables
 * (struct tf_jfmt *); fast the compiled consumer (struct tf_fast *) or None; families =
 * (AF_INET, AF_INET6, AF_UNIX); owner: kept alive while this lives. */
static int Decoder_init(Decoder *self, PyObject *args, PyObject *kw)
{
	PyObject *fns, *jp, *fp, *owner;
	unsigned int af4, af6, afu;
	static char *kwlist[] = {"fns", "jfmt", "fast", "families", "owner", NULL};
	if (!PyArg_ParseTupleAndKeywords(args, kw, "OOO(III)O", kwlist, &fns, &jp, &fp, &af4, &af6,
					 &afu, &owner))
		return -1;
	long long abi, view;
	PyObject *w, *e, *k, *c;
	if (!PyArg_ParseTuple(fns, "LLOOOO", &abi, &view, &w, &e, &k, &c))
		return -1;
	if (abi != TF_WALK_ABI || view != (long long)sizeof(struct tf_view)) {
		PyErr_Format(PyExc_RuntimeError,
			     "walker ABI %lld (view %lld bytes), this module wants %d (%zu bytes): "
			     "rebuild with make native",
			     abi, view, TF_WALK_ABI, sizeof(struct tf_view));
		return -1;
	}
	self->walk = (tf_walk_fn)as_ptr(w);
	self->exe = (tf_walk_exe_fn)as_ptr(e);
	self->kept = (tf_walk_kept_fn)as_ptr(k);
	self->count = (tf_fast_count_fn)as_ptr(c);
	self->j = as_ptr(jp);
	self->f = as_ptr(fp);
	if (PyErr_Occurred())
		return -1;
	if (!self->walk || !self->exe || !self->kept || !self->count || !self->j) {
		PyErr_SetString(PyExc_ValueError, "a null walker address or table");
		return -1;
	}
	self->af_inet = af4;
	self->af_inet6 = af6;
	self->af_unix = afu;
	Py_INCREF(owner);
	Py_XSETREF(self->owner, owner);
	if (!self->names) {
		self->names = PyMem_Calloc(NAME_SLOTS, sizeof(struct name_slot));
		if (!self->names) {
			PyErr_NoMemory();
			return -1;
		}
	}
	return 0;
}

static PyObject *raw_item(const uint8_t *d, uint32_t size, uint64_t now, long flags)
{
	return Py_BuildValue("(y#Kl)", (const char *)d, (Py_ssize_t)size,
			     (unsigned long long)now, flags);
}

/* One record: 0 and *out (a new dict, or NULL: counted only), or 1: left to Python (*why),
 * or -1 with an exception. */
static int one(Decoder *self, const uint8_t *d, uint32_t size, uint64_t now, int64_t offset,
	       int want, PyObject **out, int *why)
{
	struct tf_view v;
	*out = NULL;
	int w = self->walk(self->j, d, size, now, offset, &v);
	if (w >= 0) {
		*why = w < WHY_MAX ? w : WHY_MALFORMED;
		return 1;
	}
	if (!want)
		return 0;
	struct exe_res exe = {NULL, 0, -1};
	self->exe(self->j, d, &exe);
	PyObject *ev = event(self, &v, &exe);
	if (!ev)
		return -1;
	self->kept(self->j, &exe);
	*out = ev;
	return 0;
}

/* decode_batch(address, length, offset_ns, deliver, start, max_items) -> (items, sampled,
 * next): up to max_items entries of the compiled consumer's batch (entries of walk.h's
 * struct entry_hdr) from byte start; next: where the following ones start (length: none
 * left). A batch is decoded in such slices so that each slice's dicts are handed to the
 * sinks and freed while they are hot in the cache (memory reused, not a whole batch of
 * dicts alive at once). items, in ring order: the event dict of each record decoded here,
 * (raw, receive time, flags) of each left to Python; sampled: the dicts of records flagged
 * REC_SAMPLE. A record neither delivered (deliver false) nor sampled is only counted.
 * Decoded records are counted into the consumer's aggregates (tf_fast_count) as on_record
 * counts them, once the whole slice is decoded: on an exception nothing of the slice is
 * counted, and the caller may hand it, from start, to Python instead. */
static PyObject *Decoder_decode_batch(Decoder *self, PyObject *args)
{
	PyObject *addr;
	Py_ssize_t len, start, max_items;
	long long offset;
	int deliver;
	if (!PyArg_ParseTuple(args, "OnLpnn", &addr, &len, &offset, &deliver, &start, &max_items))
		return NULL;
	const uint8_t *base = PyLong_AsVoidPtr(addr);
	if (PyErr_Occurred())
		return NULL;
	if (len < 0 || (len && !base) || start < 0 || start > len || start % 8 || max_items < 1)
		return PyErr_Format(PyExc_ValueError, "batch of %zd bytes at %p, from %zd", len,
				    base, start);
	/* the entries decoded here (offsets), counted at the end */
	size_t ncount = 0, nitems = 0, cap = (size_t)max_items;
	size_t *counted = PyMem_Malloc(cap * sizeof(size_t));
	PyObject *items = PyList_New(0), *sampled = PyList_New(0);
	uint64_t declined[DEC_MAX] = {0}, decoded = 0;
	if (!items || !sampled || !counted) {
		PyErr_NoMemory();
		goto fail;
	}
	size_t off = (size_t)start;
	while (off + sizeof(struct entry_hdr) <= (size_t)len && nitems < (size_t)max_items) {
		nitems++;
		struct entry_hdr e;
		size_t at = off;
		memcpy(&e, base + off, sizeof(e));
		const uint8_t *d = base + off + sizeof(e);
		if (e.size > (size_t)len - off - sizeof(e)) {
			PyErr_SetString(PyExc_ValueError, "batch entry past the batch's end");
			goto fail;
		}
		off += sizeof(e) + (((size_t)e.size + 7) & ~(size_t)7);
		PyObject *item = NULL;
		int why = -1;
		if (e.flags & REC_RAW) {
			why = DEC_RAW;
		} else if (e.flags & REC_FALLBACK) {
			why = DEC_FALLBACK;
		} else {
			int sample = (e.flags & REC_SAMPLE) != 0;
			int rc = one(self, d, e.size, e.recv_ns, offset, deliver || sample, &item,
				     &why);
			if (rc < 0) {
				if (!PyErr_ExceptionMatches(PyExc_MemoryError))
					goto fail; /* a bug: said, not hidden */
				PyErr_Clear();
				why = DEC_NOMEM;
			} else if (rc == 0) {
				why = -1;
				counted[ncount++] = at;
				if (!item)
					continue;
				decoded++;
				if (sample && PyList_Append(sampled, item) < 0) {
					Py_DECREF(item);
					goto fail;
				}
			}
		}
		if (why >= 0) {
			declined[why]++;
			item = raw_item(d, e.size, e.recv_ns, e.flags & REC_RAW ? -1 : (long)e.flags);
			if (!item)
				goto fail;
		}
		int rc = PyList_Append(items, item);
		Py_DECREF(item);
		if (rc < 0)
			goto fail;
	}
	if (off > (size_t)len)
		off = (size_t)len;
	PyObject *res = Py_BuildValue("(OOn)", items, sampled, (Py_ssize_t)off);
	if (!res)
		goto fail;
	for (size_t i = 0; i < ncount; i++) {
		struct entry_hdr e;
		memcpy(&e, base + counted[i], sizeof(e));
		if (self->f)
			self->count(self->f, base + counted[i] + sizeof(e), e.size, e.recv_ns);
	}
	self->counted += ncount;
	self->decoded += decoded;
	for (int i = 0; i < DEC_MAX; i++)
		self->declined[i] += declined[i];
	PyMem_Free(counted);
	Py_DECREF(items);
	Py_DECREF(sampled);
	return res;
fail:
	PyMem_Free(counted);
	Py_XDECREF(items);
	Py_XDECREF(sampled);
	return NULL;
}

/* decode(raw, now_ns, offset_ns) -> dict, or the reason (int) it is left to Python: one
 * record, not counted into aggregates (tests, the self-check) */
static PyObject *Decoder_decode(Decoder *self, PyObject *args)
{
	Py_buffer raw;
	unsigned long long now;
	long long offset;
	if (!PyArg_ParseTuple(args, "y*KL", &raw, &now, &offset))
		return NULL;
	PyObject *ev = NULL;
	int why = -1;
	int rc = one(self, raw.buf, (uint32_t)raw.len, now, offset, 1, &ev, &why);
	PyBuffer_Release(&raw);
	if (rc < 0)
		return NULL;
	if (rc == 1)
		return PyLong_FromLong(why);
	return ev;
}

/* counters() -> (decoded, counted, declined per reason: walk.h's WHY_*, then raw, fallback,
 * nomem) */
static PyObject *Decoder_counters(Decoder *self, PyObject *Py_UNUSED(ignored))
{
	PyObject *t = PyTuple_New(DEC_MAX);
	if (!t)
		return NULL;
	for (int i = 0; i < DEC_MAX; i++) {
		PyObject *o = PyLong_FromUnsignedLongLong(self->declined[i]);
		if (!o) {
			Py_DECREF(t);
			return NULL;
		}
		PyTuple_SET_ITEM(t, i, o);
	}
	return Py_BuildValue("(KKN)", (unsigned long long)self->decoded,
			     (unsigned long long)self->counted, t);
}

static PyMethodDef Decoder_methods[] = {
	{"decode_batch", (PyCFunction)Decoder_decode_batch, METH_VARARGS,
	 "decode_batch(address, length, offset_ns, deliver) -> (items, sampled)"},
	{"decode", (PyCFunction)Decoder_decode, METH_VARARGS,
	 "decode(raw, now_ns, offset_ns) -> dict, or the reason (int) it is left to Python"},
	{"counters", (PyCFunction)Decoder_counters, METH_NOARGS,
	 "counters() -> (decoded, counted, declined per reason)"},
	{NULL, NULL, 0, NULL},
};

static PyTypeObject DecoderType = {
	PyVarObject_HEAD_INIT(NULL, 0).tp_name = "tracefleet.agent.capture._tfdecode.Decoder",
	.tp_basicsize = sizeof(Decoder),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "The compiled decode: records -> decode.py's event dicts, in batches.",
	.tp_new = PyType_GenericNew,
	.tp_init = (initproc)Decoder_init,
	.tp_dealloc = (destructor)Decoder_dealloc,
	.tp_methods = Decoder_methods,
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, .m_name = "_tfdecode",
	.m_doc = "tracefleet's compiled decode (agent/native/pydecode.c)", .m_size = -1,
};

#define INTERN(var, s)                                                                         \
	do {                                                                                   \
		if (!((var) = PyUnicode_InternFromString(s)))                                  \
			return NULL;                                                           \
	} while (0)

PyMODINIT_FUNC PyInit__tfdecode(void)
{
	INTERN(K_ts_ns, "ts_ns");
	INTERN(K_time_ns, "time_ns");
	INTERN(K_duration_ns, "duration_ns");
	INTERN(K_delivery_latency_ns, "delivery_latency_ns");
	INTERN(K_event_set, "event_set");
	INTERN(K_syscall, "syscall");
	INTERN(K_pid, "pid");
	INTERN(K_tid, "tid");
	INTERN(K_comm, "comm");
	INTERN(K_ret, "ret");
	INTERN(K_cgroup_id, "cgroup_id");
	INTERN(K_strategy, "strategy");
	INTERN(K_ppid, "ppid");
	INTERN(K_uid, "uid");
	INTERN(K_gid, "gid");
	INTERN(K_exe, "exe");
	INTERN(K_args, "args");
	INTERN(K_value, "value");
	INTERN(K_status, "status");
	INTERN(K_addr, "addr");
	INTERN(K_error, "error");
	INTERN(K_names, "names");
	INTERN(K_kind, "kind");
	INTERN(K_flags, "flags");
	INTERN(K_mode, "mode");
	INTERN(K_resolve, "resolve");
	INTERN(K_raw, "raw");
	INTERN(K_family, "family");
	INTERN(K_address, "address");
	INTERN(K_port, "port");
	INTERN(K_path, "path");
	INTERN(V_ok, "ok");
	INTERN(V_register, "register");
	INTERN(V_kernel, "kernel");
	INTERN(V_short, "short");
	INTERN(V_inet, "inet");
	INTERN(V_inet6, "inet6");
	INTERN(V_unix, "unix");
	INTERN(V_empty, "");
	PyObject *ev_keys[] = {K_ts_ns, K_time_ns, K_duration_ns, K_delivery_latency_ns,
			       K_event_set, K_syscall, K_pid, K_tid, K_comm, K_ret, K_cgroup_id,
			       K_strategy, K_ppid, K_uid, K_gid, K_exe, K_args};
	PyObject *int_keys[] = {K_value, K_status, K_strategy};
	PyObject *str_keys[] = {K_value, K_status, K_strategy, K_addr};
	struct {
		PyObject **t, **keys;
		size_t n;
	} tpl[] = {{&T_event, ev_keys, 17}, {&T_int, int_keys, 3}, {&T_str, str_keys, 4}};
	for (size_t i = 0; i < sizeof(tpl) / sizeof(tpl[0]); i++) {
		if (!(*tpl[i].t = PyDict_New()))
			return NULL;
		for (size_t k = 0; k < tpl[i].n; k++)
			if (PyDict_SetItem(*tpl[i].t, tpl[i].keys[k], Py_None) < 0)
				return NULL;
	}
	if (PyDict_SetItem(T_int, K_status, V_ok) < 0 ||
	    PyDict_SetItem(T_int, K_strategy, V_register) < 0)
		return NULL;
	if (PyType_Ready(&DecoderType) < 0)
		return NULL;
	PyObject *m = PyModule_Create(&module);
	if (!m)
		return NULL;
	Py_INCREF(&DecoderType);
	if (PyModule_AddObject(m, "Decoder", (PyObject *)&DecoderType) < 0 ||
	    PyModule_AddIntConstant(m, "WALK_ABI", TF_WALK_ABI) < 0 ||
	    PyModule_AddIntConstant(m, "VIEW_SIZE", (long)sizeof(struct tf_view)) < 0) {
		Py_DECREF(&DecoderType);
		Py_DECREF(m);
		return NULL;
	}
	return m;
}
