// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * tracefleet event set `vfs`: file activity on any file system, one record per operation
 * (open, close with the reads and writes of the open file added up, truncate, unlink, rename,
 * mkdir, rmdir, link, symlink, setattr), with path, inode, device and file-system type.
 *
 * Two hooks; the agent loads the best one the kernel allows (tf_cfg.strategy):
 *   fentry      fentry/fexit on the vfs_* functions (BPF trampolines). Paths from bpf_d_path
 *               where the kernel allows it for the hook (security_file_open, vfs_truncate),
 *               else walked from the dentry (and mount, when the hook has one).
 *   tracepoint  syscall tracepoints, where trampolines are refused: at exit, the syscall's
 *               arguments are read back from its saved registers, fds are resolved to files
 *               and paths the process passed are joined to their directory.
 * Names are read safely: see tracefleet/vfs_path.bpf.h.
 */
#include "tracefleet/vfs_path.bpf.h"
#include "tracefleet/exe.bpf.h"

#define SET TF_SET_VFS
#define TF_ATTR_SIZE (1U << 3)
#define TF_AT_REMOVEDIR 0x200
#define TF_MAX_ERRNO 4095

/*
 * One open file's state, keyed by its struct file: the reads and writes since open, and its
 * identity and path, resolved once when it was opened (or at the first close seen, for a
 * file opened before tracing started) so its close does not walk the dentries again.
 * Laid out as struct tf_vfs_event from ino to path (asserted below), three fields aside: an
 * open's record is stored as the entry, and a close's is filled from it, in one copy each.
 */
struct tf_vfs_io {
	__u64 ino;
	__u64 bytes_read;
	__u64 bytes_written;
	__u64 pos;
	__u64 dentry;   /* (event: arg) the file's dentry when cached: a struct file's address
			 * is reused after a close this hook did not see (process exit,
			 * close_range...), and an entry whose dentry differs is another file's,
			 * never reported as this */
	__u32 dev;
	__u32 reads;
	__u32 writes;
	__u8 path_kind; /* enum tf_path_kind */
	__u8 has_path;  /* (event: path2_kind) the fields below are set: TF_IO_AT_OPEN or
			 * TF_IO_AT_CLOSE */
	__u8 unlinked;  /* (event: _pad[0]) 1: the path already tells (walked when the file had
			 * no name: it ends in " (deleted)", or walked at close) */
	__u8 _pad;
	char fstype[16];
	struct tf_str path;
};

#define TF_IO_SAME(f, ef)                                                                      \
	_Static_assert(__builtin_offsetof(struct tf_vfs_io, f) ==                              \
			       __builtin_offsetof(struct tf_vfs_event, ef) -                   \
				       __builtin_offsetof(struct tf_vfs_event, ino),           \
		       "tf_vfs_io." #f " is at tf_vfs_event." #ef)
TF_IO_SAME(bytes_read, bytes_read);
TF_IO_SAME(bytes_written, bytes_written);
TF_IO_SAME(pos, pos);
TF_IO_SAME(dentry, arg);
TF_IO_SAME(dev, dev);
TF_IO_SAME(reads, reads);
TF_IO_SAME(writes, writes);
TF_IO_SAME(path_kind, path_kind);
TF_IO_SAME(has_path, path2_kind);
TF_IO_SAME(unlinked, _pad[0]);
TF_IO_SAME(fstype, fstype);
TF_IO_SAME(path, path);
/* an entry copied to or from a record in words (tf_copy_words): whole, its last word too */
#define TF_IO_WORDS (sizeof(struct tf_vfs_io) / 8)
_Static_assert(sizeof(struct tf_vfs_io) % 8 == 0 &&
		       sizeof(struct tf_vfs_io) >= __builtin_offsetof(struct tf_vfs_io, path.data) + TF_PATH_MAX,
	       "tf_vfs_io is whole words, up to its path's last byte");

#define TF_IO_AT_OPEN 1  /* resolved when the file was opened */
#define TF_IO_AT_CLOSE 2 /* opened before tracing started: resolved at its close */

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct tf_vfs_io);
} tf_vfs_io SEC(".maps");

/* the value a new tf_vfs_io entry is inserted from (per CPU: too big for the stack) */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tf_vfs_io);
} tf_vfs_io_new SEC(".maps");

/*
 * Per CPU, the key of one closed file's entry kept rather than deleted: marked closed (no
 * file has dentry 0, so tf_vfs_io_of never takes it for one), it is rewritten in place by the
 * next open of a file at that address (a struct file is reused last freed, first allocated:
 * a loop of open and close on one CPU opens every file at the same address). An open and
 * close then cost a lookup, not a map insert and delete. At most one such entry per CPU.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} tf_vfs_io_spare SEC(".maps");

/* close (tracepoint hook), between entry and exit: which file (0: none), since when */
struct tf_vfs_closing {
	__u64 file;
	__u64 ts_ns;
};

/* Kept with the thread (task storage): created at its first close and reused by every
 * later one, freed with the thread (one that dies inside close leaves nothing behind); a
 * hash keyed by tid cost an update and a delete per close. */
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct tf_vfs_closing);
} tf_vfs_closing SEC(".maps");

/* Per-thread record between the two halves of an operation (entry/exit); a plain hash, so
 * that a full map is counted rather than evicting another thread's call. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096); /* resized by the agent */
	__type(key, __u32);
	__type(value, struct tf_vfs_event);
} tf_vfs_inflight SEC(".maps");

/* Record built and sent within one program run. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tf_vfs_event);
} tf_vfs_rec SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tf_vfs_event);
} tf_vfs_zero SEC(".maps");

static __always_inline void tf_vfs_init(struct tf_vfs_event *e, __u16 op)
{
	tf_fill_hdr(&e->hdr, TF_KIND_VFS, SET, op);
	tf_fill_exe(&e->hdr, SET);
}

static __always_inline void tf_str_reset(struct tf_str *s)
{
	s->uptr = 0;
	s->err = 0;
	s->len = 0;
	s->status = TF_ST_NONE;
	s->strategy = TF_STRAT_NONE;
}

/* A record for this run (per CPU), or NULL. Only what a record carries is reset (header,
 * fixed part, string heads): the string bytes past their length never leave the kernel. */
static __always_inline struct tf_vfs_event *tf_vfs_new(__u16 op)
{
	__u32 zero = 0;
	struct tf_vfs_event *e = bpf_map_lookup_elem(&tf_vfs_rec, &zero);

	if (!e)
		return NULL;
	e->hdr.ret = 0;
	e->hdr._pad[0] = e->hdr._pad[1] = 0;
	e->ino = e->bytes_read = e->bytes_written = e->pos = e->arg = 0;
	e->dev = e->reads = e->writes = 0;
	e->path_kind = e->path2_kind = 0;
	e->_pad[0] = e->_pad[1] = 0;
	__builtin_memset(e->fstype, 0, sizeof(e->fstype));
	tf_str_reset(&e->path);
	tf_str_reset(&e->path2);
	tf_vfs_init(e, op);
	/* made at the exit (or the only hook) of its operation: one clock read for both */
	e->hdr.exit_ns = e->hdr.ts_ns;
	return e;
}

/* A zeroed record kept for this thread until the operation returns, or NULL. */
static __always_inline struct tf_vfs_event *tf_vfs_stash(__u16 op)
{
	__u32 zero = 0, tid = (__u32)bpf_get_current_pid_tgid();
	struct tf_vfs_event *tmpl = bpf_map_lookup_elem(&tf_vfs_zero, &zero), *e;

	if (!tmpl)
		return NULL;
	if (bpf_map_update_elem(&tf_vfs_inflight, &tid, tmpl, BPF_ANY)) {
		tf_count(SET, TF_STAT_INFLIGHT_FULL);
		return NULL;
	}
	e = bpf_map_lookup_elem(&tf_vfs_inflight, &tid);
	if (e)
		tf_vfs_init(e, op);
	return e;
}

static __always_inline struct tf_vfs_event *tf_vfs_stashed(__u16 op)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct tf_vfs_event *e = bpf_map_lookup_elem(&tf_vfs_inflight, &tid);

	return e && e->hdr.syscall == op ? e : NULL;
}

static __always_inline void tf_vfs_unstash(void)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();

	bpf_map_delete_elem(&tf_vfs_inflight, &tid);
}

#define TF_VFS_FIXED offsetof(struct tf_vfs_event, path)

/*
 * Send e. The record (events.h: header and fixed part, path, path2) is e's own bytes up to
 * path's data, then path2's head and bytes: when those fit in path's buffer after its bytes
 * they are moved there, and the record goes out in one copy (bpf_ringbuf_output) instead of
 * a reservation, three writes and a submit; a path too long for that takes the writes.
 */
static __always_inline void tf_vfs_emit(struct tf_vfs_event *e, long ret)
{
	__u32 l1, l2, size;

	e->hdr.ret = ret;
	if (!e->hdr.exit_ns) /* stashed at the entry of its operation */
		e->hdr.exit_ns = bpf_ktime_get_ns();
	/* a mount-relative path cannot be matched here: the agent matches it once it has
	 * prefixed the mount point */
	if (e->path_kind != TF_PATH_MOUNT_REL && !tf_prefix_ok(SET, &e->path)) {
		tf_count(SET, TF_STAT_FILTERED);
		return;
	}
	tf_count_status(SET, e->path.status);
	tf_count_status(SET, e->path2.status);
	l1 = tf_str_out_len(&e->path);
	l2 = tf_str_out_len(&e->path2);
	size = TF_VFS_FIXED + 2 * TF_STRH_SIZE + l1 + l2;
	if (l1 + TF_STRH_SIZE + l2 > TF_PATH_MAX) {
		struct tf_rec r;

		if (!tf_rec_begin(&r, SET, size))
			return;
		tf_rec_put(&r, e, TF_VFS_FIXED);
		tf_rec_str(&r, &e->path, l1, TF_PATH_MAX - 1);
		tf_rec_str(&r, &e->path2, l2, TF_PATH_MAX - 1);
		tf_rec_end(&r, SET);
		return;
	}
	/* path2's head, then its bytes, right after path's bytes (path2 itself lies past
	 * path's buffer: no overlap) */
	l1 &= TF_PATH_MAX - 1;
	__builtin_memcpy(&e->path.data[l1], &e->path2, TF_STRH_SIZE);
	if (l2) {
		l2 &= TF_PATH_MAX - 1;
		bpf_probe_read_kernel(&e->path.data[(l1 + TF_STRH_SIZE) & (TF_PATH_MAX - 1)], l2,
				      e->path2.data);
	}
	tf_barrier_var(size);
	if (size > TF_VFS_FIXED + TF_STRH_SIZE + TF_PATH_MAX) { /* for the verifier: clamped */
		tf_count(SET, TF_STAT_DROPPED);
		return;
	}
	tf_rec_output(SET, e, size);
}

/* The second half of an operation whose record was stashed by the first: send it. */
static __always_inline int tf_vfs_finish(__u16 op, long ret)
{
	struct tf_vfs_event *e = tf_vfs_stashed(op);

	if (e) {
		tf_vfs_emit(e, ret);
		tf_vfs_unstash();
	}
	return 0;
}

static __always_inline bool tf_vfs_on(void)
{
	return tf_should_trace(SET, bpf_get_current_pid_tgid() >> 32);
}

/* The cached state of open file f, or NULL; a stale entry (another file that had the same
 * address: every entry carries its file's dentry) is dropped. */
static __always_inline struct tf_vfs_io *tf_vfs_io_of(struct file *f)
{
	__u64 key = (__u64)f;
	struct tf_vfs_io *io = bpf_map_lookup_elem(&tf_vfs_io, &key);

	if (io && io->dentry != (__u64)tf_file_dentry(f)) {
		bpf_map_delete_elem(&tf_vfs_io, &key);
		return NULL;
	}
	return io;
}

/* A new entry for open file f, in the per-CPU template (too big for the stack): totals at
 * zero, no path yet, and f's dentry, by which tf_vfs_io_of tells it from a later file at
 * the same address. */
static __always_inline struct tf_vfs_io *tf_vfs_io_fresh(struct file *f)
{
	__u32 zero = 0;
	struct tf_vfs_io *n = bpf_map_lookup_elem(&tf_vfs_io_new, &zero);

	if (!n)
		return NULL;
	n->bytes_read = n->bytes_written = n->pos = 0;
	n->reads = n->writes = 0;
	n->has_path = 0;
	n->unlinked = 0;
	n->_pad = 0;
	n->dentry = (__u64)tf_file_dentry(f);
	return n;
}

/* Reads and writes: add to the open file's totals. */
static __always_inline void tf_vfs_account(struct file *f, long ret, bool write, __u64 pos)
{
	__u64 key = (__u64)f;
	struct tf_vfs_io *io;

	if (ret <= 0 || !f || !tf_vfs_on() || tf_pseudo_fs(tf_file_dentry(f)))
		return;
	/* checked like at close: a stale entry's totals are another file's, and the close of
	 * this one would drop them with it */
	io = tf_vfs_io_of(f);
	if (!io) {
		/* opened before tracing started, or unseen (memfd_create...): resolved at close */
		struct tf_vfs_io *n = tf_vfs_io_fresh(f);

		if (!n)
			return;
		bpf_map_update_elem(&tf_vfs_io, &key, n, BPF_NOEXIST);
		io = bpf_map_lookup_elem(&tf_vfs_io, &key);
		if (!io)
			return;
	}
	if (write) {
		__sync_fetch_and_add(&io->bytes_written, ret);
		__sync_fetch_and_add(&io->writes, 1);
	} else {
		__sync_fetch_and_add(&io->bytes_read, ret);
		__sync_fetch_and_add(&io->reads, 1);
	}
	io->pos = pos;
}

/* Copy a path (head and bytes) between two tf_str. */
static __always_inline void tf_str_copy(struct tf_str *dst, const struct tf_str *src)
{
	__u64 n = src->len; /* 64 bits: the verifier keeps the bound checked below */

	tf_barrier_var(n);
	if (n > TF_PATH_MAX - 1)
		n = TF_PATH_MAX - 1;
	bpf_probe_read_kernel(dst, TF_STRH_SIZE + n, src);
	dst->len = n;
}

/* This CPU's spare entry if it is key's and still closed (the spare is then taken), else
 * NULL. */
static __always_inline struct tf_vfs_io *tf_vfs_io_reuse(__u64 key)
{
	__u32 zero = 0;
	__u64 *spare = bpf_map_lookup_elem(&tf_vfs_io_spare, &zero);
	struct tf_vfs_io *io;

	if (!spare || *spare != key)
		return NULL;
	*spare = 0;
	io = bpf_map_lookup_elem(&tf_vfs_io, &key);
	return io && !io->dentry ? io : NULL;
}

/* A closed file's entry: kept as this CPU's spare, unless the spare still holds another
 * closed entry (then deleted, as every entry was before the spare). */
static __always_inline void tf_vfs_io_release(struct tf_vfs_io *io, __u64 key)
{
	__u32 zero = 0;
	__u64 *spare = bpf_map_lookup_elem(&tf_vfs_io_spare, &zero);

	if (spare && *spare && *spare != key) {
		struct tf_vfs_io *old = bpf_map_lookup_elem(&tf_vfs_io, spare);

		if (old && !old->dentry)
			spare = NULL;
	}
	if (!spare) {
		bpf_map_delete_elem(&tf_vfs_io, &key);
		return;
	}
	io->dentry = 0;
	*spare = key;
}

/* Keep an opened file's identity and path with its state, for its close: e itself, from
 * ino on, is the new entry (totals at zero), its three other fields set for the copy; it
 * rewrites this CPU's spare entry when that one is at the file's address. */
static __always_inline void tf_vfs_cache(struct file *f, struct tf_vfs_event *e, __u8 when)
{
	__u64 key = (__u64)f, arg = e->arg, n;
	bool torn = false; /* an O_TMPFILE's walk at open already said " (deleted)" */
	struct tf_vfs_io *io = tf_vfs_io_reuse(key);

	/* a new open file (a struct file's address is reused only after the old one is freed) */
	e->bytes_read = e->bytes_written = e->pos = 0;
	e->reads = e->writes = 0;
	e->arg = (__u64)tf_file_dentry(f);
	e->path2_kind = when;
	e->_pad[0] = when == TF_IO_AT_CLOSE || tf_dentry_unlinked(tf_file_dentry(f), &torn);
	e->_pad[1] = 0;
	if (io) {
		n = e->path.len; /* 64 bits: the verifier keeps the bound checked below */
		tf_barrier_var(n);
		if (n > TF_PATH_MAX - 1)
			n = TF_PATH_MAX - 1;
		tf_copy_words(io, &e->ino, offsetof(struct tf_vfs_io, path.data) + n,
			      TF_IO_WORDS);
	} else {
		bpf_map_update_elem(&tf_vfs_io, &key, &e->ino, BPF_ANY);
	}
	e->arg = arg;
	e->path2_kind = 0;
	e->_pad[0] = 0;
}

/* Fill e's identity, path and totals from an open file's cached state, in one copy; false
 * if it has no path. */
static __always_inline bool tf_vfs_from_cache(struct tf_vfs_event *e, struct tf_vfs_io *io)
{
	__u64 n;
	__u8 kind;

	if (!io || !io->has_path)
		return false;
	/* the name at open (a rename since is not seen): said so by the path kind (a
	 * mount-relative path stays so: the agent still has to prefix its mount point) */
	kind = io->has_path == TF_IO_AT_OPEN && io->path_kind != TF_PATH_MOUNT_REL
		       ? TF_PATH_AT_OPEN
		       : io->path_kind;
	n = io->path.len; /* 64 bits: the verifier keeps the bound checked below */
	tf_barrier_var(n);
	if (n > TF_PATH_MAX - 1)
		n = TF_PATH_MAX - 1;
	tf_copy_words(&e->ino, io, offsetof(struct tf_vfs_io, path.data) + n, TF_IO_WORDS);
	e->path.len = n;
	e->arg = 0;
	e->path_kind = kind;
	e->path2_kind = 0;
	e->_pad[0] = e->_pad[1] = 0;
	return true;
}

/*
 * At close, a cached name at open may have been unlinked since (or the file was an
 * O_TMPFILE): end it in " (deleted)" as d_path() would, never passing it off as a live
 * name. A name with no room left for the marker is said truncated.
 */
static __always_inline void tf_vfs_io_unlinked(struct tf_vfs_io *io, struct file *f)
{
	bool torn = false;
	__u32 len;

	if (!io || !io->has_path || io->unlinked || io->path.status == TF_ST_LOST)
		return;
	if (!tf_dentry_unlinked(tf_file_dentry(f), &torn))
		return;
	io->unlinked = 1;
	len = io->path.len;
	if (len > TF_PATH_MAX - 1 - TF_DELETED_LEN) {
		io->path.status = TF_ST_TRUNCATED;
		return;
	}
	__builtin_memcpy(&io->path.data[len], TF_DELETED, TF_DELETED_LEN);
	io->path.len = len + TF_DELETED_LEN;
}

static __always_inline void tf_vfs_take_io(struct tf_vfs_event *e, struct tf_vfs_io *io)
{
	e->bytes_read = io->bytes_read;
	e->bytes_written = io->bytes_written;
	e->reads = io->reads;
	e->writes = io->writes;
	e->pos = io->pos;
}

/* A file's identity and path, and, for a close, what was read and written through it (its
 * path then from the open file's state when it was resolved at open). */
static __always_inline void tf_vfs_file(struct tf_vfs_event *e, struct file *f, bool take_io)
{
	struct dentry *d = tf_file_dentry(f);
	__u64 key = (__u64)f;
	struct tf_vfs_io *io = take_io ? tf_vfs_io_of(f) : NULL;

	tf_vfs_io_unlinked(io, f);
	if (tf_vfs_from_cache(e, io)) {
		tf_vfs_io_release(io, key);
		return;
	}
	tf_fill_inode(e, d);
	e->path_kind = tf_walk_path(&e->path, d, tf_file_mnt(f));
	if (io) { /* totals only: opened before tracing started */
		tf_vfs_take_io(e, io);
		tf_vfs_io_release(io, key);
	}
}

/* A dentry-only operation: mount-relative path (the hook has no mount). */
static __always_inline void tf_vfs_dentry(struct tf_vfs_event *e, struct dentry *d)
{
	tf_fill_inode(e, d);
	e->path_kind = tf_walk_path(&e->path, d, NULL);
}

static __always_inline long tf_func_ret(void *ctx)
{
	__u64 ret = 0;

	bpf_get_func_ret(ctx, &ret);
	return (long)ret;
}

/* ---- hook `fentry`: the vfs_* functions --------------------------------------------- */

/* open: bpf_d_path is allowed here; the result comes at vfs_open's exit */
SEC("fentry/security_file_open")
int BPF_PROG(vf_open_lsm, struct file *file)
{
	struct tf_vfs_event *e;
	long n;

	if (!tf_vfs_on() || tf_pseudo_fs(file->f_path.dentry))
		return 0;
	e = tf_vfs_stash(TF_VFS_OPEN);
	if (!e)
		return 0;
	tf_fill_inode(e, file->f_path.dentry);
	e->arg = file->f_flags;
	n = bpf_d_path((struct path *)&file->f_path, e->path.data, sizeof(e->path.data));
	if (n > 0) {
		tf_path_result(&e->path, n - 1, 0, false, false);
		e->path_kind = TF_PATH_D_PATH;
	} else { /* too long for the buffer: walk, keeping the last components */
		e->path_kind = tf_walk_path(&e->path, file->f_path.dentry, file->f_path.mnt);
	}
	return 0;
}

SEC("fexit/vfs_open")
int BPF_PROG(vf_open, const struct path *path, struct file *file)
{
	struct tf_vfs_event *e;
	long ret = tf_func_ret(ctx);

	if ((e = tf_vfs_stashed(TF_VFS_OPEN))) {
		if (!ret)
			tf_vfs_cache(file, e, TF_IO_AT_OPEN);
		return tf_vfs_finish(TF_VFS_OPEN, ret);
	}
	/* failed before the LSM hook, or no LSM: walk */
	if (!tf_vfs_on() || tf_pseudo_fs(path->dentry))
		return 0;
	e = tf_vfs_new(TF_VFS_OPEN);
	if (!e)
		return 0;
	tf_fill_inode(e, path->dentry);
	e->arg = file->f_flags;
	e->path_kind = tf_walk_path(&e->path, path->dentry, path->mnt);
	if (!ret)
		tf_vfs_cache(file, e, TF_IO_AT_OPEN);
	tf_vfs_emit(e, ret);
	return 0;
}

static __always_inline __u64 tf_kpos(struct file *file, loff_t *pos)
{
	loff_t v = 0;

	if (pos && !bpf_probe_read_kernel(&v, sizeof(v), pos))
		return v;
	return BPF_CORE_READ(file, f_pos);
}

SEC("fexit/vfs_read")
int BPF_PROG(vf_read, struct file *file, char *buf, size_t count, loff_t *pos)
{
	tf_vfs_account(file, tf_func_ret(ctx), false, tf_kpos(file, pos));
	return 0;
}

SEC("fexit/vfs_write")
int BPF_PROG(vf_write, struct file *file, const char *buf, size_t count, loff_t *pos)
{
	tf_vfs_account(file, tf_func_ret(ctx), true, tf_kpos(file, pos));
	return 0;
}

SEC("fexit/vfs_readv")
int BPF_PROG(vf_readv, struct file *file, const struct iovec *vec, unsigned long vlen, loff_t *pos)
{
	tf_vfs_account(file, tf_func_ret(ctx), false, tf_kpos(file, pos));
	return 0;
}

SEC("fexit/vfs_writev")
int BPF_PROG(vf_writev, struct file *file, const struct iovec *vec, unsigned long vlen,
	     loff_t *pos)
{
	tf_vfs_account(file, tf_func_ret(ctx), true, tf_kpos(file, pos));
	return 0;
}

/* close(2) and the closes at exit both flush the file */
SEC("fexit/filp_flush")
int BPF_PROG(vf_close, struct file *filp)
{
	struct tf_vfs_event *e;

	if (!tf_vfs_on() || tf_pseudo_fs(filp->f_path.dentry))
		return 0;
	e = tf_vfs_new(TF_VFS_CLOSE);
	if (!e)
		return 0;
	tf_vfs_file(e, filp, true);
	tf_vfs_emit(e, tf_func_ret(ctx));
	return 0;
}

SEC("fexit/vfs_truncate")
int BPF_PROG(vf_truncate, const struct path *path, loff_t length)
{
	struct tf_vfs_event *e;
	long n;

	if (!tf_vfs_on())
		return 0;
	e = tf_vfs_new(TF_VFS_TRUNCATE);
	if (!e)
		return 0;
	tf_fill_inode(e, path->dentry);
	e->arg = length;
	n = bpf_d_path((struct path *)path, e->path.data, sizeof(e->path.data));
	if (n > 0) {
		tf_path_result(&e->path, n - 1, 0, false, false);
		e->path_kind = TF_PATH_D_PATH;
	} else {
		e->path_kind = tf_walk_path(&e->path, path->dentry, path->mnt);
	}
	tf_vfs_emit(e, tf_func_ret(ctx));
	return 0;
}

SEC("fexit/do_ftruncate")
int BPF_PROG(vf_ftruncate, struct file *file, loff_t length)
{
	struct tf_vfs_event *e;

	if (!tf_vfs_on())
		return 0;
	e = tf_vfs_new(TF_VFS_TRUNCATE);
	if (!e)
		return 0;
	tf_vfs_file(e, file, false);
	e->arg = length;
	tf_vfs_emit(e, tf_func_ret(ctx));
	return 0;
}

/* unlink, rmdir, rename: names and inode before the operation changes them */
static __always_inline int tf_vfs_begin(__u16 op, struct dentry *dentry)
{
	struct tf_vfs_event *e;

	if (tf_vfs_on() && (e = tf_vfs_stash(op)))
		tf_vfs_dentry(e, dentry);
	return 0;
}

SEC("fentry/vfs_unlink")
int BPF_PROG(vf_unlink_enter, struct mnt_idmap *idmap, struct inode *dir, struct dentry *dentry)
{
	return tf_vfs_begin(TF_VFS_UNLINK, dentry);
}

SEC("fexit/vfs_unlink")
int BPF_PROG(vf_unlink)
{
	return tf_vfs_finish(TF_VFS_UNLINK, tf_func_ret(ctx));
}

SEC("fentry/vfs_rmdir")
int BPF_PROG(vf_rmdir_enter, struct mnt_idmap *idmap, struct inode *dir, struct dentry *dentry)
{
	return tf_vfs_begin(TF_VFS_RMDIR, dentry);
}

SEC("fexit/vfs_rmdir")
int BPF_PROG(vf_rmdir)
{
	return tf_vfs_finish(TF_VFS_RMDIR, tf_func_ret(ctx));
}

SEC("fentry/vfs_rename")
int BPF_PROG(vf_rename_enter, struct renamedata *rd)
{
	struct tf_vfs_event *e;

	if (!tf_vfs_on() || !(e = tf_vfs_stash(TF_VFS_RENAME)))
		return 0;
	tf_vfs_dentry(e, BPF_CORE_READ(rd, old_dentry));
	e->path2_kind = tf_walk_path(&e->path2, BPF_CORE_READ(rd, new_dentry), NULL);
	return 0;
}

SEC("fexit/vfs_rename")
int BPF_PROG(vf_rename)
{
	return tf_vfs_finish(TF_VFS_RENAME, tf_func_ret(ctx));
}

/* mkdir, symlink, link, setattr: after the fact, the new names are in place */
SEC("fexit/vfs_mkdir")
int BPF_PROG(vf_mkdir, struct mnt_idmap *idmap, struct inode *dir, struct dentry *dentry,
	     umode_t mode)
{
	struct tf_vfs_event *e;
	long ret = tf_func_ret(ctx);

	if (!tf_vfs_on() || !(e = tf_vfs_new(TF_VFS_MKDIR)))
		return 0;
	/* returns the new dentry (which may differ from the argument) or an ERR_PTR */
	if ((unsigned long)ret >= (unsigned long)-TF_MAX_ERRNO) {
		tf_vfs_dentry(e, dentry);
	} else {
		tf_vfs_dentry(e, ret ? (struct dentry *)ret : dentry);
		ret = 0;
	}
	e->arg = mode;
	tf_vfs_emit(e, ret);
	return 0;
}

SEC("fexit/vfs_symlink")
int BPF_PROG(vf_symlink, struct mnt_idmap *idmap, struct inode *dir, struct dentry *dentry,
	     const char *oldname)
{
	struct tf_vfs_event *e;
	long n;

	if (!tf_vfs_on() || !(e = tf_vfs_new(TF_VFS_SYMLINK)))
		return 0;
	tf_vfs_dentry(e, dentry);
	n = bpf_probe_read_kernel_str(e->path2.data, sizeof(e->path2.data), oldname);
	tf_path_result(&e->path2, n > 0 ? n - 1 : 0, n > 0 ? 0 : -EFAULT, false,
		       n >= (long)sizeof(e->path2.data));
	e->path2_kind = TF_PATH_USER;
	tf_vfs_emit(e, tf_func_ret(ctx));
	return 0;
}

SEC("fexit/vfs_link")
int BPF_PROG(vf_link, struct dentry *old_dentry, struct mnt_idmap *idmap, struct inode *dir,
	     struct dentry *new_dentry)
{
	struct tf_vfs_event *e;

	if (!tf_vfs_on() || !(e = tf_vfs_new(TF_VFS_LINK)))
		return 0;
	tf_vfs_dentry(e, old_dentry);
	e->path2_kind = tf_walk_path(&e->path2, new_dentry, NULL);
	tf_vfs_emit(e, tf_func_ret(ctx));
	return 0;
}

SEC("fexit/notify_change")
int BPF_PROG(vf_setattr, struct mnt_idmap *idmap, struct dentry *dentry, struct iattr *attr)
{
	struct tf_vfs_event *e;
	unsigned int valid = BPF_CORE_READ(attr, ia_valid);

	/* size changes are reported as truncate (vfs_truncate, do_ftruncate) or in open flags */
	if (valid & TF_ATTR_SIZE)
		return 0;
	if (!tf_vfs_on() || !(e = tf_vfs_new(TF_VFS_SETATTR)))
		return 0;
	tf_vfs_dentry(e, dentry);
	e->arg = valid;
	tf_vfs_emit(e, tf_func_ret(ctx));
	return 0;
}

/* ---- hook `tracepoint`: syscalls, resolved at exit ----------------------------------- */

#define NO (-1)

static __always_inline unsigned long tf_sc_arg(struct pt_regs *regs, int i)
{
	switch (i) {
	case 0:
		return PT_REGS_PARM1_CORE_SYSCALL(regs);
	case 1:
		return PT_REGS_PARM2_CORE_SYSCALL(regs);
	case 2:
		return PT_REGS_PARM3_CORE_SYSCALL(regs);
	case 3:
		return PT_REGS_PARM4_CORE_SYSCALL(regs);
	case 4:
		return PT_REGS_PARM5_CORE_SYSCALL(regs);
	}
	return 0;
}

static __always_inline struct pt_regs *tf_sc_regs(void)
{
	return (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
}

/* A raw string the process passed (a symlink's target): kept as is, not joined. */
static __always_inline void tf_user_str(struct tf_str *out, unsigned long uptr)
{
	out->uptr = uptr;
	if (!uptr) {
		out->status = TF_ST_NONE;
		return;
	}
	tf_str_result(out, bpf_probe_read_user_str(out->data, sizeof(out->data), (void *)uptr),
		      TF_ST_OK, tf_cfg.strategy);
}

/*
 * One syscall that names files. fd: index of an fd argument (the file itself); dfd/p and
 * dfd2/p2: a directory fd and a path relative to it; a: an argument to report as `arg`.
 * AT_FDCWD is implied when dfd is NO.
 */
static __always_inline int tf_vfs_sc(long ret, __u16 op, int fd, int dfd, int p, int dfd2,
				     int p2, int a)
{
	struct pt_regs *regs;
	struct tf_vfs_event *e;
	unsigned long path;

	if (!tf_vfs_on())
		return 0;
	regs = tf_sc_regs();
	path = p >= 0 ? tf_sc_arg(regs, p) : 0;
	if (op == TF_VFS_UNLINK && a >= 0 && (tf_sc_arg(regs, a) & TF_AT_REMOVEDIR))
		op = TF_VFS_RMDIR;
	if (!(e = tf_vfs_new(op)))
		return 0;
	if (a >= 0 && op != TF_VFS_RMDIR && op != TF_VFS_UNLINK)
		e->arg = tf_sc_arg(regs, a);
	if (fd >= 0 || (p >= 0 && !path && dfd >= 0)) { /* an fd, or utimensat(fd, NULL, ...) */
		struct file *f = tf_fd_file(tf_sc_arg(regs, fd >= 0 ? fd : dfd));

		if (!f)
			return 0;
		if (tf_pseudo_fs(tf_file_dentry(f)))
			return 0;
		tf_vfs_file(e, f, false);
	} else if (p >= 0) {
		int d = dfd >= 0 ? (int)tf_sc_arg(regs, dfd) : TF_AT_FDCWD;

		e->path_kind = tf_user_path(&e->path, path, d, e);
	}
	if (p2 >= 0) {
		unsigned long path2 = tf_sc_arg(regs, p2);

		if (op == TF_VFS_SYMLINK) {
			tf_user_str(&e->path2, path2);
			e->path2_kind = TF_PATH_USER;
		} else {
			int d2 = dfd2 >= 0 ? (int)tf_sc_arg(regs, dfd2) : TF_AT_FDCWD;

			e->path2_kind = tf_user_path(&e->path2, path2, d2, NULL);
		}
	}
	tf_vfs_emit(e, ret);
	return 0;
}

/* open: on success the new fd is resolved to the file the kernel opened */
static __always_inline int tf_vfs_sc_open(long ret, int dfd, int p, int flags)
{
	struct pt_regs *regs;
	struct tf_vfs_event *e;

	if (!tf_vfs_on())
		return 0;
	if (ret >= 0) {
		struct file *f = tf_fd_file(ret);

		if (!f || tf_pseudo_fs(tf_file_dentry(f)))
			return 0;
		if (!(e = tf_vfs_new(TF_VFS_OPEN)))
			return 0;
		tf_vfs_file(e, f, false);
		tf_vfs_cache(f, e, TF_IO_AT_OPEN);
		e->arg = TF_KPTR(struct file, f)->f_flags;
	} else {
		if (!(e = tf_vfs_new(TF_VFS_OPEN)))
			return 0;
		regs = tf_sc_regs();
		e->path_kind = tf_user_path(&e->path, tf_sc_arg(regs, p),
					    dfd >= 0 ? (int)tf_sc_arg(regs, dfd) : TF_AT_FDCWD, e);
		if (flags >= 0)
			e->arg = tf_sc_arg(regs, flags);
	}
	tf_vfs_emit(e, ret);
	return 0;
}

/* read and write: pos is the offset argument of the p-variants, else the file position */
static __always_inline int tf_vfs_sc_io(long ret, bool write, int pos_arg)
{
	struct pt_regs *regs;
	struct file *f;
	__u64 pos;

	if (ret <= 0)
		return 0;
	regs = tf_sc_regs();
	f = tf_fd_file(tf_sc_arg(regs, 0));
	if (!f)
		return 0;
	pos = pos_arg >= 0 ? tf_sc_arg(regs, pos_arg) : (__u64)-1;
	if (pos == (__u64)-1) /* no offset, or preadv2's -1: the file position moved */
		pos = TF_KPTR(struct file, f)->f_pos;
	else
		pos += ret;
	tf_vfs_account(f, ret, write, pos);
	return 0;
}

#define TF_VFS_SC(name, op, fd, dfd, p, dfd2, p2, a)                                           \
	SEC("tp/syscalls/sys_exit_" #name)                                                    \
	int vt_##name(struct trace_event_raw_sys_exit *ctx)                                   \
	{                                                                                     \
		return tf_vfs_sc(ctx->ret, op, fd, dfd, p, dfd2, p2, a);                       \
	}

#define TF_VFS_SC_OPEN(name, dfd, p, flags)                                                    \
	SEC("tp/syscalls/sys_exit_" #name)                                                    \
	int vt_##name(struct trace_event_raw_sys_exit *ctx)                                   \
	{                                                                                     \
		return tf_vfs_sc_open(ctx->ret, dfd, p, flags);                                \
	}

#define TF_VFS_SC_IO(name, write, pos)                                                         \
	SEC("tp/syscalls/sys_exit_" #name)                                                    \
	int vt_##name(struct trace_event_raw_sys_exit *ctx)                                   \
	{                                                                                     \
		return tf_vfs_sc_io(ctx->ret, write, pos);                                     \
	}

/*             name        dfd  path flags */
TF_VFS_SC_OPEN(openat,     0,   1,   2)
TF_VFS_SC_OPEN(openat2,    0,   1,   NO)
/*           name       write  pos */
TF_VFS_SC_IO(read,      false, NO)
TF_VFS_SC_IO(pread64,   false, 3)
TF_VFS_SC_IO(readv,     false, NO)
TF_VFS_SC_IO(preadv,    false, 3)
TF_VFS_SC_IO(preadv2,   false, 3)
TF_VFS_SC_IO(write,     true,  NO)
TF_VFS_SC_IO(pwrite64,  true,  3)
TF_VFS_SC_IO(writev,    true,  NO)
TF_VFS_SC_IO(pwritev,   true,  3)
TF_VFS_SC_IO(pwritev2,  true,  3)
/*        name        op               fd  dfd  path dfd2 path2 arg */
TF_VFS_SC(ftruncate,  TF_VFS_TRUNCATE, 0,  NO,  NO,  NO,  NO,   1)
TF_VFS_SC(truncate,   TF_VFS_TRUNCATE, NO, NO,  0,   NO,  NO,   1)
TF_VFS_SC(unlinkat,   TF_VFS_UNLINK,   NO, 0,   1,   NO,  NO,   2)
TF_VFS_SC(renameat,   TF_VFS_RENAME,   NO, 0,   1,   2,   3,    NO)
TF_VFS_SC(renameat2,  TF_VFS_RENAME,   NO, 0,   1,   2,   3,    4)
TF_VFS_SC(mkdirat,    TF_VFS_MKDIR,    NO, 0,   1,   NO,  NO,   2)
TF_VFS_SC(linkat,     TF_VFS_LINK,     NO, 0,   1,   2,   3,    NO)
TF_VFS_SC(symlinkat,  TF_VFS_SYMLINK,  NO, 1,   2,   NO,  0,    NO)
TF_VFS_SC(fchmod,     TF_VFS_SETATTR,  0,  NO,  NO,  NO,  NO,   1)
TF_VFS_SC(fchmodat,   TF_VFS_SETATTR,  NO, 0,   1,   NO,  NO,   2)
TF_VFS_SC(fchown,     TF_VFS_SETATTR,  0,  NO,  NO,  NO,  NO,   1)
TF_VFS_SC(fchownat,   TF_VFS_SETATTR,  NO, 0,   1,   NO,  NO,   2)
TF_VFS_SC(utimensat,  TF_VFS_SETATTR,  NO, 0,   1,   NO,  NO,   NO)

#if defined(__TARGET_ARCH_x86)
/* legacy x86-64 entry points that glibc still uses */
TF_VFS_SC_OPEN(open,       NO,  0,   1)
TF_VFS_SC_OPEN(creat,      NO,  0,   NO)
TF_VFS_SC(unlink,     TF_VFS_UNLINK,   NO, NO,  0,   NO,  NO,   NO)
TF_VFS_SC(rmdir,      TF_VFS_RMDIR,    NO, NO,  0,   NO,  NO,   NO)
TF_VFS_SC(rename,     TF_VFS_RENAME,   NO, NO,  0,   NO,  1,    NO)
TF_VFS_SC(mkdir,      TF_VFS_MKDIR,    NO, NO,  0,   NO,  NO,   1)
TF_VFS_SC(link,       TF_VFS_LINK,     NO, NO,  0,   NO,  1,    NO)
TF_VFS_SC(symlink,    TF_VFS_SYMLINK,  NO, NO,  1,   NO,  0,    NO)
TF_VFS_SC(chmod,      TF_VFS_SETATTR,  NO, NO,  0,   NO,  NO,   1)
TF_VFS_SC(chown,      TF_VFS_SETATTR,  NO, NO,  0,   NO,  NO,   1)
TF_VFS_SC(lchown,     TF_VFS_SETATTR,  NO, NO,  0,   NO,  NO,   1)
#endif

/*
 * close: the fd is gone at exit, so the file is looked up at entry. Its path was resolved at
 * open and kept with its state (tf_vfs_io); only a file opened before tracing started (or
 * whose state the LRU evicted) is walked here, once. Entry parks only the file's address.
 */
SEC("tp/syscalls/sys_enter_close")
int vt_close_enter(struct trace_event_raw_sys_enter *ctx)
{
	struct tf_vfs_closing *c;
	struct tf_vfs_event *e;
	struct tf_vfs_io *io;
	struct file *f;
	__u64 key;

	if (!tf_vfs_on())
		return 0;
	f = tf_fd_file(ctx->args[0]);
	if (!f || tf_pseudo_fs(tf_file_dentry(f)))
		return 0;
	key = (__u64)f;
	io = tf_vfs_io_of(f);
	if (!io || !io->has_path) {
		if (!(e = tf_vfs_new(TF_VFS_CLOSE)))
			return 0;
		tf_vfs_file(e, f, false);
		if (io) { /* keep its totals */
			io->ino = e->ino;
			io->dev = e->dev;
			io->path_kind = e->path_kind;
			__builtin_memcpy(io->fstype, e->fstype, sizeof(io->fstype));
			tf_str_copy(&io->path, &e->path);
			io->has_path = TF_IO_AT_CLOSE;
			io->unlinked = 1; /* walked just now: marked if so */
			io->dentry = (__u64)tf_file_dentry(f);
		} else {
			tf_vfs_cache(f, e, TF_IO_AT_CLOSE);
		}
		io = NULL;
	} else {
		tf_vfs_io_unlinked(io, f);
	}
	c = bpf_task_storage_get(&tf_vfs_closing, bpf_get_current_task_btf(), NULL,
				 BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!c) { /* no memory, or the storage busy (a nested program on this CPU) */
		tf_count(SET, TF_STAT_INFLIGHT_FULL);
		return 0;
	}
	c->file = key;
	c->ts_ns = bpf_ktime_get_ns();
	return 0;
}

SEC("tp/syscalls/sys_exit_close")
int vt_close(struct trace_event_raw_sys_exit *ctx)
{
	struct tf_vfs_closing *c =
		bpf_task_storage_get(&tf_vfs_closing, bpf_get_current_task_btf(), NULL, 0);
	struct tf_vfs_event *e;
	struct tf_vfs_io *io;
	__u64 key;

	if (!c || !c->file)
		return 0;
	key = c->file;
	c->file = 0;
	io = bpf_map_lookup_elem(&tf_vfs_io, &key);
	if (io && !io->dentry) /* closed already (the same file through another fd): a spare */
		io = NULL;
	e = tf_vfs_new(TF_VFS_CLOSE);
	if (e) {
		e->hdr.ts_ns = c->ts_ns;
		if (tf_vfs_from_cache(e, io)) {
			tf_vfs_emit(e, ctx->ret);
		} else { /* its state was evicted between entry and exit: say the path is lost */
			e->path.status = TF_ST_LOST;
			e->path.err = -2; /* ENOENT */
			tf_vfs_emit(e, ctx->ret);
		}
	}
	if (io)
		tf_vfs_io_release(io, key);
	return 0;
}
