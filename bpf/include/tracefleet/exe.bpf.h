/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * tracefleet: the process's executable, in every record, for 16 bytes.
 *
 * A record's header carries the identity of task->mm->exe_file (inode number, device,
 * i_generation), read with direct BTF loads, a few nanoseconds. Its full path is walked once,
 * the first time that identity is seen on the node, and kept in tf_exes (an LRU hash shared
 * by every object, created by the agent), where the agent looks it up once and caches it.
 * A per-CPU note of the last identity found in tf_exes skips even the hash lookup while one
 * program keeps running on a CPU (the common case of a busy process).
 *
 * What the path is: the name the file had when first seen (a file renamed since keeps it);
 * a file deleted before it was first seen, or an exec'd memfd, ends in " (deleted)" as in
 * /proc/PID/exe; a path longer than the buffer is stored TRUNCATED (the agent reports none).
 * A path that could not be walked (a name torn by a concurrent rename, a read error) is not
 * stored and counted (TF_STAT_EXE_UNRESOLVED): the next record of that identity tries again.
 *
 * Called where the record is written (syscall exit, a vfs hook), never from a sleepable
 * program: one of those can be preempted, and another program on its CPU would then reuse
 * the per-CPU buffers of a walk in progress. So a record names the executable of the
 * process when the call returned (an exec: the new image once it succeeded).
 */
#ifndef __TRACEFLEET_EXE_BPF_H
#define __TRACEFLEET_EXE_BPF_H

#include "tracefleet/vfs_path.bpf.h"

/* identity -> path; the agent creates it (--exe-entries) and hands its fd to every object */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 64);
	__type(key, struct tf_exe_key);
	__type(value, struct tf_str);
} tf_exes SEC(".maps");

/* last identity this CPU found stored in tf_exes, and the walk's output buffer (room after
 * it for a " (deleted)" appended to a path of up to TF_PATH_MAX - 1 bytes) */
struct tf_exe_cpu {
	struct tf_exe_key last;
	struct tf_str path;
	char spill[TF_DELETED_LEN + 1];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tf_exe_cpu);
} tf_exe_cpu SEC(".maps");

/* Walk the executable's path and store it under c->last; 0 when stored. A subprogram: the
 * walk is verified once, not in every caller. */
static __noinline int tf_exe_resolve(struct tf_exe_cpu *c, struct file *exe)
{
	struct dentry *d = BPF_CORE_READ(exe, f_path.dentry);
	struct vfsmount *m = BPF_CORE_READ(exe, f_path.mnt);

	if (!c || !d)
		return -1;
	tf_walk_path_ex(&c->path, d, m, true);
	if (c->path.status != TF_ST_OK && c->path.status != TF_ST_TRUNCATED)
		return -1;
	/* A file of no directory (its dentry is its own parent, and not a mount's root): an
	 * exec'd memfd or another pseudo file. d_path names it with simple_dname, "/NAME
	 * (deleted)", so /proc/PID/exe does; the walk gave "/NAME". */
	if (BPF_CORE_READ(d, d_parent) == d && d != BPF_CORE_READ(m, mnt_root)) {
		__u32 len = c->path.len;

		if (len > TF_PATH_MAX - 1 - TF_DELETED_LEN) {
			c->path.status = TF_ST_TRUNCATED;
		} else {
			tf_barrier_var(len);
			len &= TF_PATH_MAX - 1;
			__builtin_memcpy(&c->path.data[len], TF_DELETED, TF_DELETED_LEN);
			c->path.len = len + TF_DELETED_LEN;
		}
	}
	return bpf_map_update_elem(&tf_exes, &c->last, &c->path, BPF_ANY) ? -1 : 0;
}

static __always_inline void tf_fill_exe(struct tf_hdr *h, __u32 set)
{
	/* direct BTF loads (a fault reads 0), not bpf_probe_read_kernel calls: this runs for
	 * every record */
	struct task_struct *task = bpf_get_current_task_btf();
	struct mm_struct *mm = task->mm;
	struct file *exe;
	struct inode *inode;
	struct tf_exe_cpu *c;
	__u32 zero = 0;
	__u64 ino;
	__u32 dev, gen;

	if (!mm)
		return; /* a kernel thread: exe_ino stays 0 */
	exe = mm->exe_file;
	if (!exe)
		return;
	inode = exe->f_inode;
	ino = inode->i_ino;
	dev = inode->i_sb->s_dev;
	gen = inode->i_generation;
	h->exe_ino = ino;
	h->exe_dev = dev;
	h->exe_gen = gen;
	c = bpf_map_lookup_elem(&tf_exe_cpu, &zero);
	if (!c)
		return;
	if (c->last.ino == ino && c->last.dev == dev && c->last.gen == gen)
		return;
	c->last.ino = ino;
	c->last.dev = dev;
	c->last.gen = gen;
	if (bpf_map_lookup_elem(&tf_exes, &c->last))
		return;
	if (tf_exe_resolve(c, exe)) {
		c->last.ino = 0; /* not stored: look again next time */
		tf_count(set, TF_STAT_EXE_UNRESOLVED);
	}
}

#endif /* __TRACEFLEET_EXE_BPF_H */
