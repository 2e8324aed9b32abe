/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * tracefleet: names of kernel file objects, read without trusting what a rename can change.
 *
 * A dentry's name (d_name.name, d_name.len) and parent are rewritten by a concurrent rename:
 * short names live inside the dentry and are copied over in place, so a reader can see half
 * of one name and half of another, or a length that does not match the bytes. Every name is
 * therefore read bounded by its NUL (bpf_probe_read_kernel_str, never d_name.len alone), and
 * the dentry's d_seq seqcount, which __d_move bumps around the change, is read before and
 * after: an odd or changed count, a changed parent, or a length that disagrees with the
 * bytes marks the path TF_ST_TORN instead of passing it off as true. bpf_d_path, where a
 * hook allows it, resolves under the kernel's own locks and needs none of this.
 */
#ifndef __TRACEFLEET_VFS_PATH_BPF_H
#define __TRACEFLEET_VFS_PATH_BPF_H

#include "tracefleet/common.bpf.h"

#define TF_WALK_MAX 32    /* dentries and mount crossings per path */
#define TF_SCRATCH 512    /* power of two; a path is built backwards in [0, TF_SCRATCH) */
#define TF_NAME_MAX 256   /* NAME_MAX + NUL */
#define TF_AT_FDCWD (-100)
#define TF_SB_NOUSER (1U << 31) /* pseudo file systems: pipes, sockets, anon inodes */

/*
 * Fields of kernel objects are read with direct loads through BTF-typed pointers (relocated
 * by CO-RE like BPF_CORE_READ; a faulting load reads 0), not with a bpf_probe_read_kernel
 * call per field: those calls (copy_from_kernel_nofault) were a fifth of the traced open+close
 * loop's CPU time. TF_KPTR types a pointer the verifier only knows as a number (read from a
 * map, a helper, or a u64 field) again; the verifier turns bpf_rdonly_cast into a move.
 */
extern void *bpf_rdonly_cast(const void *obj__ign, __u32 btf_id__k) __ksym;
#define TF_KPTR(type, p) ((type *)bpf_rdonly_cast((const void *)(p), bpf_core_type_id_kernel(type)))

struct tf_vfs_scratch {
	char walk[2 * TF_SCRATCH];
	char join[2 * TF_SCRATCH];
	char name[TF_NAME_MAX];
	/* the file-system type whose name is in fstype (its struct file_system_type and name
	 * pointers: static, in the kernel or its module), so that a run of files on one file
	 * system reads the name once per CPU, not once per file */
	__u64 fstype_type;
	__u64 fstype_ptr;
	char fstype[16];
	/* start of the path built so far in walk. Here, not in the walk's stack state: a map
	 * value is a value the verifier does not track, so the bpf_loop step below is verified
	 * in a few passes instead of once per range of offsets it can reach (15,500 instructions
	 * to verify an exit program with the exe walk; 5,400 this way) */
	__u32 walk_off;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tf_vfs_scratch);
} tf_vfs_scratch SEC(".maps");

static __always_inline struct tf_vfs_scratch *tf_scratch(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&tf_vfs_scratch, &zero);
}

/* dev_t, file-system type and inode of a dentry. */
static __always_inline void tf_fill_inode(struct tf_vfs_event *e, struct dentry *d0)
{
	struct dentry *d = TF_KPTR(struct dentry, d0);
	struct super_block *sb = d->d_sb;
	struct file_system_type *type = sb->s_type;
	const char *name = type->name;
	struct inode *ino = d->d_inode;
	struct tf_vfs_scratch *s = tf_scratch();

	e->dev = sb->s_dev;
	if (ino)
		e->ino = ino->i_ino;
	if (!s) {
		bpf_probe_read_kernel_str(e->fstype, sizeof(e->fstype), name);
		return;
	}
	if (s->fstype_type != (__u64)type || s->fstype_ptr != (__u64)name) {
		__builtin_memset(s->fstype, 0, sizeof(s->fstype));
		bpf_probe_read_kernel_str(s->fstype, sizeof(s->fstype), name);
		s->fstype_type = (__u64)type;
		s->fstype_ptr = (__u64)name;
	}
	__builtin_memcpy(e->fstype, s->fstype, sizeof(e->fstype));
}

static __always_inline bool tf_pseudo_fs(struct dentry *d)
{
	return TF_KPTR(struct dentry, d)->d_sb->s_flags & TF_SB_NOUSER;
}

/* The dentry and the mount of an open file. */
static __always_inline struct dentry *tf_file_dentry(struct file *f)
{
	return TF_KPTR(struct file, f)->f_path.dentry;
}

static __always_inline struct vfsmount *tf_file_mnt(struct file *f)
{
	return TF_KPTR(struct file, f)->f_path.mnt;
}

/*
 * Load-time switch, for the tests' negative control only: when set, the d_seq/parent/length
 * check below is skipped, so names a concurrent rename was rewriting pass as true (the rename
 * storm test shows it then finds wrong names). Never set by the agent.
 */
const volatile bool tf_vfs_no_torn_check = false;

/*
 * Read one dentry's name into s->name; returns its length (NUL excluded) or -errno, and sets
 * *torn when a rename may have changed it during the read.
 */
static __always_inline long tf_dentry_name(struct tf_vfs_scratch *s, struct dentry *d0,
					   struct dentry **parent, bool *torn)
{
	/* the helper call between the two reads of d_seq is a compiler barrier: they are
	 * loaded in this order */
	struct dentry *d = TF_KPTR(struct dentry, d0);
	unsigned int seq1 = d->d_seq.seqcount.sequence;
	struct dentry *p1 = d->d_parent;
	const unsigned char *name = d->d_name.name;
	__u32 len = d->d_name.len;
	long n = bpf_probe_read_kernel_str(s->name, sizeof(s->name), name);
	unsigned int seq2 = d->d_seq.seqcount.sequence;
	struct dentry *p2 = d->d_parent;

	*parent = p1;
	if (n <= 0)
		return n < 0 ? n : -EFAULT;
	if (!tf_vfs_no_torn_check &&
	    ((seq1 & 1) || seq1 != seq2 || p1 != p2 || (__u32)(n - 1) != len))
		*torn = true;
	return n - 1;
}

#ifndef E2BIG
#define E2BIG 7
#endif

/*
 * The walk's read of one name: like tf_dentry_name, but straight into its place in s->walk,
 * ending at off (one helper call per component, not a read and a copy). walk[off] and the
 * byte after it are kept: the read may put its NUL there. At most d_name.len + 1 bytes are
 * read, so a name longer than its length (torn) shows as len + 1 bytes. Returns the name's
 * length, -E2BIG if it does not fit before off (with its '/'), or -errno.
 */
static __always_inline long tf_walk_name(struct tf_vfs_scratch *s, struct dentry *d0, __u32 off,
					 struct dentry **parent, bool *torn)
{
	struct dentry *d = TF_KPTR(struct dentry, d0);
	unsigned int seq1 = d->d_seq.seqcount.sequence, seq2;
	struct dentry *p1 = d->d_parent, *p2;
	const unsigned char *name = d->d_name.name;
	__u32 len = d->d_name.len, start, got;
	char keep0, keep1;
	long n;

	*parent = p1;
	if (len > TF_NAME_MAX - 1)
		len = TF_NAME_MAX - 1; /* not a name's length: the read below tells */
	if (off > TF_SCRATCH - 1 || off < len + 1)
		return -E2BIG;
	start = off - len;
	keep0 = s->walk[off & (TF_SCRATCH - 1)];
	keep1 = s->walk[(off + 1) & (2 * TF_SCRATCH - 1)];
	n = bpf_probe_read_kernel_str(&s->walk[start & (TF_SCRATCH - 1)],
				      (len & (TF_NAME_MAX - 1)) + 2, name);
	seq2 = d->d_seq.seqcount.sequence;
	p2 = d->d_parent;
	s->walk[off & (TF_SCRATCH - 1)] = keep0;
	s->walk[(off + 1) & (2 * TF_SCRATCH - 1)] = keep1;
	if (n <= 0)
		return n < 0 ? n : -EFAULT;
	got = n - 1;
	if (!tf_vfs_no_torn_check && ((seq1 & 1) || seq1 != seq2 || p1 != p2 || got != len))
		*torn = true;
	if (got < len) { /* ended early: move it up to off (through s->name: they overlap) */
		got &= TF_NAME_MAX - 1;
		bpf_probe_read_kernel(s->name, got, &s->walk[start & (TF_SCRATCH - 1)]);
		bpf_probe_read_kernel(&s->walk[(off - got) & (TF_SCRATCH - 1)], got, s->name);
		len = got;
	}
	return len;
}

/*
 * Whether d is no longer in the namespace (d_unlinked(): unhashed and not a root): a file
 * unlinked while open, or an O_TMPFILE, which never had a name (the kernel names its dentry
 * "#<inode>"). Its walked path then ends in " (deleted)", as d_path() and /proc/PID/fd say,
 * never passed off as a name that exists. Read inside the d_seq window: a rename keeps the
 * dentry hashed, but a changed count marks the path torn.
 */
#define TF_DELETED " (deleted)"
#define TF_DELETED_LEN (sizeof(TF_DELETED) - 1)

static __always_inline bool tf_dentry_unlinked(struct dentry *d0, bool *torn)
{
	/* volatile: four loads in this order, the count first and last */
	volatile struct dentry *d = TF_KPTR(struct dentry, d0);
	unsigned int seq1 = d->d_seq.seqcount.sequence;
	void *pprev = d->d_hash.pprev;
	struct dentry *p = d->d_parent;
	unsigned int seq2 = d->d_seq.seqcount.sequence;

	if (!tf_vfs_no_torn_check && ((seq1 & 1) || seq1 != seq2))
		*torn = true;
	return !pprev && p != d;
}

/* Set status, length and error of a path produced by the walk or d_path. */
static __always_inline void tf_path_result(struct tf_str *out, long len, long err, bool torn,
					   bool truncated)
{
	out->strategy = tf_cfg.strategy;
	out->uptr = 0;
	if (err < 0) {
		out->err = err;
		out->len = 0;
		out->status = TF_ST_LOST;
		return;
	}
	out->err = 0;
	out->len = len;
	out->status = torn ? TF_ST_TORN : truncated ? TF_ST_TRUNCATED : TF_ST_OK;
}

/* State of one walk, shared with the bpf_loop callback that takes one step. */
struct tf_walk {
	__u64 d;      /* struct dentry * being named */
	__u64 vmnt;   /* struct vfsmount * it is seen through, 0 if unknown */
	__u64 m;      /* the struct mount around vmnt */
	__u64 root_d; /* the task's root, where a full path ends */
	__u64 root_m;
	__s32 err;
	__u8 torn;
	__u8 truncated;
	__u8 done;
};

/* One step up: name the dentry and move to its parent, or cross to the mount below. */
static long tf_walk_step(__u32 i, struct tf_walk *w)
{
	struct tf_vfs_scratch *s = tf_scratch();
	struct dentry *d = (struct dentry *)w->d, *top, *p = NULL;
	struct vfsmount *vmnt = (struct vfsmount *)w->vmnt;
	bool torn = false;
	__u32 off;
	long n;

	if (!s)
		return 1;
	off = s->walk_off;
	if (vmnt && w->d == w->root_d && w->vmnt == w->root_m)
		goto done;
	top = vmnt ? TF_KPTR(struct vfsmount, vmnt)->mnt_root
		   : TF_KPTR(struct dentry, d)->d_sb->s_root;
	if ((__u64)top == w->d) {
		struct mount *m, *up;

		if (!w->m)
			goto done;
		m = TF_KPTR(struct mount, w->m);
		up = m->mnt_parent;
		if (!up || (__u64)up == w->m)
			goto done;
		w->d = (__u64)m->mnt_mountpoint;
		w->m = (__u64)up;
		w->vmnt = (__u64)up + bpf_core_field_offset(struct mount, mnt);
		return 0;
	}
	n = tf_walk_name(s, d, off, &p, &torn);
	if (torn)
		w->torn = 1;
	if (n == -E2BIG) {
		w->truncated = 1;
		goto done;
	}
	if (n < 0) {
		w->err = n;
		goto done;
	}
	off -= n + 1;
	s->walk[off & (TF_SCRATCH - 1)] = '/';
	s->walk_off = off;
	if (!p || p == d)
		goto done;
	w->d = (__u64)p;
	return 0;
done:
	w->done = 1;
	return 1;
}

/*
 * Walk from dentry d up to the task's root, crossing mounts when vmnt is known (full path,
 * TF_PATH_WALK), or up to the file system's root when it is not (TF_PATH_MOUNT_REL). A path
 * longer than the buffer keeps its last components and is marked truncated. bpf_loop keeps
 * the verifier's work to one step, however deep the path. An unlinked d ends in " (deleted)"
 * unless mark_unlinked is false (a directory a user path is joined to).
 */
static __noinline int tf_walk_path_ex(struct tf_str *out, struct dentry *d,
				      struct vfsmount *vmnt, bool mark_unlinked)
{
	struct tf_vfs_scratch *s = tf_scratch();
	struct task_struct *task = bpf_get_current_task_btf();
	struct tf_walk w = {};
	__u32 len, start, off;

	if (!s || !d || !out)
		return TF_PATH_NONE;
	w.d = (__u64)d;
	s->walk_off = TF_SCRATCH - 1;
	if (vmnt) {
		w.vmnt = (__u64)vmnt;
		w.m = (__u64)vmnt - bpf_core_field_offset(struct mount, mnt);
		w.root_d = (__u64)task->fs->root.dentry;
		w.root_m = (__u64)task->fs->root.mnt;
	}
	s->walk[TF_SCRATCH - 1] = 0;
	if (mark_unlinked) {
		bool torn = false;

		if (tf_dentry_unlinked(d, &torn)) { /* the walk prepends the components to it */
			s->walk_off = TF_SCRATCH - 1 - TF_DELETED_LEN;
			__builtin_memcpy(&s->walk[TF_SCRATCH - 1 - TF_DELETED_LEN], TF_DELETED,
					 TF_DELETED_LEN);
		}
		if (torn)
			w.torn = 1;
	}
	bpf_loop(TF_WALK_MAX, tf_walk_step, &w, 0);
	if (!w.done)
		w.truncated = 1;
	off = s->walk_off;
	if (off >= TF_SCRATCH - 1) { /* the root itself */
		off = TF_SCRATCH - 2;
		s->walk[off] = '/';
	}
	len = TF_SCRATCH - 1 - off;
	start = off;
	if (len > TF_PATH_MAX - 1) {
		w.truncated = 1;
		start = TF_SCRATCH - TF_PATH_MAX;
		len = TF_PATH_MAX - 1;
	}
	/* the path's bytes only; the NUL written after them ends it */
	tf_barrier_var(len);
	bpf_probe_read_kernel(out->data, len & (TF_PATH_MAX - 1), &s->walk[start & (TF_SCRATCH - 1)]);
	out->data[len & (TF_PATH_MAX - 1)] = 0;
	tf_path_result(out, len, w.err, w.torn, w.truncated);
	return vmnt ? TF_PATH_WALK : TF_PATH_MOUNT_REL;
}

#define tf_walk_path(out, d, vmnt) tf_walk_path_ex(out, d, vmnt, true)

/* The file behind descriptor fd of the current task, or NULL. */
static __always_inline struct file *tf_fd_file(int fd)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct fdtable *fdt = task->files->fdt;
	struct file *f = NULL;

	if (fd < 0 || (unsigned int)fd >= fdt->max_fds)
		return NULL;
	/* an element at a variable index, which a BTF load cannot reach: loaded as the first
	 * member (a pointer) of a struct list_head cast at its address, a plain load with the
	 * fault handling of BTF loads (a fault reads 0), not a helper call */
	f = (struct file *)TF_KPTR(struct list_head, (__u64)fdt->fd + (__u64)fd * sizeof(f))->next;
	return f ? TF_KPTR(struct file, f) : NULL;
}

/*
 * A name the process passed (user memory, read after the syscall ran, so the kernel has
 * faulted it in), made absolute with the directory it is relative to (dirfd, or the cwd).
 */
static __noinline __attribute__((unused)) /* exec.bpf.c has only the walk */
int tf_user_path(struct tf_str *out, unsigned long uptr, int dfd, struct tf_vfs_event *e)
{
	struct tf_vfs_scratch *s = tf_scratch();
	struct task_struct *task = bpf_get_current_task_btf();
	struct dentry *dir_d;
	struct vfsmount *dir_m;
	char first = 0;
	long n;
	__u32 dlen, total;

	if (!s)
		return TF_PATH_NONE;
	out->uptr = uptr;
	out->strategy = tf_cfg.strategy;
	if (!uptr) {
		out->status = TF_ST_NONE;
		return TF_PATH_NONE;
	}
	if (bpf_probe_read_user(&first, 1, (void *)uptr) < 0 || first == '/') {
		n = bpf_probe_read_user_str(out->data, sizeof(out->data), (void *)uptr);
		/* the file system is not known without a lookup: dev stays 0 (the agent fills it
		 * from the directory in the process's root) */
		tf_str_result(out, n, TF_ST_OK, tf_cfg.strategy);
		return TF_PATH_USER;
	}
	if (dfd == TF_AT_FDCWD) {
		dir_d = task->fs->pwd.dentry;
		dir_m = task->fs->pwd.mnt;
	} else {
		struct file *f = tf_fd_file(dfd);

		if (!f) {
			out->status = TF_ST_LOST;
			out->err = -9; /* EBADF */
			return TF_PATH_USER;
		}
		dir_d = tf_file_dentry(f);
		dir_m = tf_file_mnt(f);
	}
	if (e && !e->dev) {
		tf_fill_inode(e, dir_d);
		e->ino = 0; /* the directory's, not the file's */
	}
	tf_walk_path_ex(out, dir_d, dir_m, false);
	if (out->status == TF_ST_LOST)
		return TF_PATH_USER;
	/* join: "<dir>/<name>" built in scratch, then copied back */
	dlen = out->len & (TF_PATH_MAX - 1);
	bpf_probe_read_kernel(s->join, sizeof(out->data), out->data);
	if (dlen == 1) /* the root: "/" + name */
		dlen = 0;
	s->join[dlen & (TF_SCRATCH - 1)] = '/';
	n = bpf_probe_read_user_str(&s->join[(dlen + 1) & (TF_SCRATCH - 1)], TF_SCRATCH,
				    (void *)uptr);
	if (n <= 0) {
		out->err = n < 0 ? n : -EFAULT;
		out->status = TF_ST_LOST;
		out->len = 0;
		return TF_PATH_USER;
	}
	total = dlen + n; /* "/" + name, NUL excluded */
	if (total > TF_PATH_MAX - 1) {
		total = TF_PATH_MAX - 1;
		if (out->status == TF_ST_OK)
			out->status = TF_ST_TRUNCATED;
	}
	bpf_probe_read_kernel(out->data, sizeof(out->data), s->join);
	tf_barrier_var(total);
	out->data[total & (TF_PATH_MAX - 1)] = 0;
	out->len = total;
	return TF_PATH_USER;
}

#endif /* __TRACEFLEET_VFS_PATH_BPF_H */
