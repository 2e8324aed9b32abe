/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * tracefleet: the ABI between the BPF programs and the agent.
 *
 * Every struct and constant the agent decodes is defined here, once. The Python mirror lives
 * in agent/src/tracefleet/agent/kernel/abi.py and tests/bpf/test_abi_layout.py checks it
 * against the BTF that clang emits for each object (as Tetragon's alignchecker does).
 * Only fixed-width types; explicit padding; no bitfields.
 */
#ifndef __TRACEFLEET_EVENTS_H
#define __TRACEFLEET_EVENTS_H

#define TF_COMM_LEN 16
#define TF_PATH_MAX 256          /* bytes of a captured path, NUL included */
#define TF_BLOB_MAX 128          /* struct open_how, struct sockaddr_storage */
#define TF_ARGV_COUNT 16         /* argv entries captured per exec */
#define TF_ARG_MAX 128           /* bytes per argv entry, NUL included */
#define TF_NSTR 2                /* string arguments per syscall event */
#define TF_SET_MAX 8             /* event-set slots in the control map */
#define TF_FILTER_PIDS 8
#define TF_FILTER_COMMS 4
#define TF_PREFIX_MAX 64

/* Event sets: bit N of tf_control.enabled_bits enables set N. */
enum tf_event_set {
	TF_SET_FILE = 0,
	TF_SET_EXEC = 1,
	TF_SET_NET = 2,
	TF_SET_VFS = 3,
};

/* Status of one captured argument. PENDING never leaves the kernel. */
enum tf_status {
	TF_ST_NONE = 0,      /* argument not present (NULL pointer, unused slot) */
	TF_ST_OK = 1,        /* read at syscall entry */
	TF_ST_RECOVERED = 2, /* faulted at entry, read later (exit retry, exec hook, user space) */
	TF_ST_LOST = 3,      /* could not be read; err holds the last error */
	TF_ST_TRUNCATED = 4, /* read, but longer than the buffer */
	TF_ST_PENDING = 5,   /* faulted at entry, retry scheduled */
	TF_ST_TORN = 6,      /* a kernel name changed while it was read (concurrent rename):
			      * the value may mix two names and is not to be trusted */
	TF_ST_MISMATCH = 7,  /* re-read after the call, and its last component is not the name
			      * of the file the kernel opened: the record carries the kernel's
			      * path (open family, str[1]); the re-read value is not to be trusted */
	TF_ST_REREAD = 8,    /* struct re-read after the call (exit retry): the memory may have
			      * changed since the kernel used it, and nothing can check it */
};

/* Capture strategies, best first. */
enum tf_strategy {
	TF_STRAT_NONE = 0,
	TF_STRAT_SLEEPABLE = 1,        /* sleepable tracepoint, bpf_copy_from_user{,_str} */
	TF_STRAT_FENTRY_SLEEPABLE = 2, /* fentry.s on the syscall function */
	TF_STRAT_EXIT_RETRY = 3,       /* nofault read at entry, retried at exit */
	TF_STRAT_USER_FALLBACK = 4,    /* process_vm_readv from the agent (racy) */
	TF_STRAT_NOFAULT = 5,          /* nofault read at entry only */
	/* hooks of the vfs set (it reads kernel objects, not user memory) */
	TF_STRAT_FENTRY = 6,           /* fentry/fexit on the vfs_* functions (BPF trampolines) */
	TF_STRAT_TRACEPOINT = 7,       /* syscall tracepoints, fds resolved to files at exit */
};

enum tf_syscall {
	TF_SC_OPENAT = 1,
	TF_SC_OPENAT2 = 2,
	TF_SC_CREAT = 3,
	TF_SC_UNLINKAT = 4,
	TF_SC_RENAMEAT2 = 5,
	TF_SC_MKDIRAT = 6,
	TF_SC_FCHMODAT = 7,
	TF_SC_TRUNCATE = 8,
	TF_SC_STATX = 9,
	TF_SC_READLINKAT = 10,
	TF_SC_CHDIR = 11,
	TF_SC_OPEN = 12,       /* legacy x86-64 entry points, still used by glibc */
	TF_SC_MKDIR = 13,
	TF_SC_UNLINK = 14,
	TF_SC_RMDIR = 15,
	TF_SC_RENAME = 16,
	TF_SC_CHMOD = 17,
	TF_SC_NEWFSTATAT = 18,
	TF_SC_READLINK = 19,
	TF_SC_EXECVE = 20,
	TF_SC_EXECVEAT = 21,
	TF_SC_CONNECT = 30,
	TF_SC_BIND = 31,
	TF_SC_ACCEPT4 = 32,
	TF_SC_SENDTO = 33,
	/* vfs set: operations, whichever hook observed them */
	TF_VFS_OPEN = 40,
	TF_VFS_CLOSE = 41,    /* carries the reads and writes since open, aggregated in the kernel */
	TF_VFS_TRUNCATE = 42,
	TF_VFS_UNLINK = 43,
	TF_VFS_RENAME = 44,
	TF_VFS_MKDIR = 45,
	TF_VFS_RMDIR = 46,
	TF_VFS_LINK = 47,
	TF_VFS_SYMLINK = 48,
	TF_VFS_SETATTR = 49,
};

/*
 * Ring buffer records are as long as what they hold. The structs below (tf_event,
 * tf_exec_event, tf_vfs_event) are the programs' working state between a call's entry and
 * exit; a record written to the ring is a compact encoding of one of them:
 *
 *   struct tf_hdr (at offset 0, unchanged), then the kind's fixed part, then its strings,
 *   each a string head of TF_STRH_SIZE bytes (the first fields of struct tf_str and of
 *   struct tf_blob: uptr, err, len, status, strategy) followed by exactly `len` bytes (no
 *   NUL, no padding; nothing after the fixed part is aligned). The record ends with the last
 *   string: its size is the ring sample's size.
 *
 *   TF_KIND_SYSCALL  tf_event up to str (hdr, iargs); str[0], str[1], blob
 *   TF_KIND_EXEC     tf_exec_event up to filename; filename; the argv head (tf_exec_event
 *                    argv_uptr .. argv_strategy, TF_ARGVH_SIZE bytes); then argc entries,
 *                    each a __u16 length and that many bytes
 *   TF_KIND_VFS      tf_vfs_event up to path; path; path2
 *
 * A 3-byte path costs its head and 3 bytes, not TF_PATH_MAX.
 */
#define TF_STRH_SIZE 16
#define TF_ARGVH_SIZE 16
#define TF_REC_MAX 4096 /* bound of any record (exec: 128 + 16 + 255 + 16 + 16 * 129) */

/* Record kinds in the ring buffer; each record starts with struct tf_hdr. */
enum tf_kind {
	TF_KIND_SYSCALL = 1, /* struct tf_event */
	TF_KIND_EXEC = 2,    /* struct tf_exec_event */
	TF_KIND_VFS = 3,     /* struct tf_vfs_event */
};

/* Per-set counters in tf_stats (per CPU); index = set * TF_STAT_MAX + stat. */
enum tf_stat {
	TF_STAT_EVENTS = 0,        /* records written to the ring buffer */
	TF_STAT_DROPPED = 1,       /* records lost: ring buffer full */
	TF_STAT_ARG_OK = 2,
	TF_STAT_ARG_RECOVERED = 3,
	TF_STAT_ARG_LOST = 4,
	TF_STAT_ARG_TRUNCATED = 5,
	TF_STAT_FILTERED = 6,      /* syscalls skipped by a filter */
	TF_STAT_INFLIGHT_FULL = 7, /* entries that found no room for per-thread state (hash
				    * full; file, net: task storage not allocated) */
	TF_STAT_ORPHAN_EXIT = 8,   /* exits with no matching entry (attached mid-syscall) */
	TF_STAT_ARG_TORN = 9,      /* names changed while read (concurrent rename) */
	TF_STAT_PASSED = 10,       /* syscall entries that passed the pid/comm/cgroup filters */
	TF_STAT_PREFIX_FILTERED = 11, /* of those, dropped at exit by the path-prefix filter */
	TF_STAT_ARG_MISMATCH = 12, /* re-read names that differ from the file the kernel opened */
	TF_STAT_ARG_REREAD = 13,   /* structs re-read after the call (unverifiable) */
	TF_STAT_INFLIGHT_STALE = 14, /* calls that never exited, counted lost: an entry found
				      * its thread's slot still taken (exec's hash: the thread
				      * died mid-call and its tid was reused), or (file, net)
				      * the thread exited with its slot taken */
	TF_STAT_EXE_UNRESOLVED = 15, /* executables seen whose path could not be stored in
				      * tf_exes (walk failed or torn, map refused): their
				      * records' exe is unknown until a later record resolves it */
	/* identity, per set, once no call is in flight: PASSED = EVENTS + DROPPED +
	 * INFLIGHT_FULL + INFLIGHT_STALE + PREFIX_FILTERED + calls the agent counted lost
	 * (entries it deleted; file/net: calls in flight when it detached the set) */
	TF_STAT_MAX = 16,
};

struct tf_str {
	__u64 uptr;   /* user address read, kept for the user-space fallback */
	__s32 err;    /* last read error (negative errno), 0 if none */
	__u16 len;    /* bytes captured, NUL excluded */
	__u8 status;  /* enum tf_status */
	__u8 strategy; /* enum tf_strategy that produced data */
	char data[TF_PATH_MAX];
};

struct tf_blob {
	__u64 uptr;
	__s32 err;
	__u16 len;    /* bytes captured */
	__u8 status;
	__u8 strategy;
	__u8 data[TF_BLOB_MAX];
};

struct tf_hdr {
	__u64 ts_ns;     /* syscall entry, bpf_ktime_get_ns (CLOCK_MONOTONIC) */
	__u64 exit_ns;   /* syscall exit */
	__u64 cgroup_id;
	__s64 ret;
	__u32 pid;       /* tgid */
	__u32 tid;
	__u16 kind;      /* enum tf_kind */
	__u16 syscall;   /* enum tf_syscall */
	__u8 event_set;  /* enum tf_event_set */
	__u8 strategy;   /* strategy of the loaded programs */
	__u8 _pad[2];
	char comm[TF_COMM_LEN];
	/* process context at syscall entry */
	__u32 ppid;      /* tgid of real_parent */
	__u32 uid;       /* real uid, gid (the task's cred, as init_user_ns sees them) */
	__u32 gid;
	__u32 ctx_ok;    /* 1 when ppid/uid/gid were read (0 = unknown, not root) */
	/* identity of the process's executable (task->mm->exe_file's inode); exe_ino 0: none
	 * (a kernel thread). Its path is in tf_exes, keyed by struct tf_exe_key, filled by the
	 * kernel the first time an identity is seen (exe.bpf.h): records carry 16 bytes, not
	 * the path. */
	__u64 exe_ino;
	__u32 exe_dev;   /* kernel dev_t of its file system */
	__u32 exe_gen;   /* i_generation: an inode number reused for another file differs */
};

/* Key of tf_exes (the same three fields as tf_hdr's exe_*); value: struct tf_str, the
 * walked path (status OK, TRUNCATED; a path that could not be read is not stored). */
struct tf_exe_key {
	__u64 ino;
	__u32 dev;
	__u32 gen;
};

struct tf_event {
	struct tf_hdr hdr;
	__s64 iargs[6];  /* raw syscall arguments */
	struct tf_str str[TF_NSTR]; /* open family (one path): str[1] is the kernel's path of
				     * the opened file when str[0] was not read at entry */
	struct tf_blob blob;
};

struct tf_exec_event {
	struct tf_hdr hdr;
	__s64 iargs[6];
	struct tf_str filename;
	__u64 argv_uptr;
	__s32 argv_err;
	__u16 argc;      /* entries captured */
	__u8 argv_status;
	__u8 argv_strategy;
	__u16 arg_len[TF_ARGV_COUNT];
	char argv[TF_ARGV_COUNT][TF_ARG_MAX];
};

/* How a vfs event's path was obtained. */
enum tf_path_kind {
	TF_PATH_NONE = 0,
	TF_PATH_D_PATH = 1,    /* bpf_d_path: full path, resolved by the kernel under its locks */
	TF_PATH_WALK = 2,      /* full path, dentries and mounts walked up to the task's root */
	TF_PATH_MOUNT_REL = 3, /* only a dentry was at hand: path from the file system's root */
	TF_PATH_USER = 4,      /* the name the process passed (joined to its directory fd) */
	TF_PATH_AT_OPEN = 5,   /* close: the full path resolved when the file was opened, kept
				* with the open file's state: the name at open, even if the
				* file was renamed or unlinked since */
};

/*
 * One file-system operation. Read and write are not an event per call: bytes, calls and the
 * last position are added up per open file in the kernel and reported with its close.
 */
struct tf_vfs_event {
	struct tf_hdr hdr;      /* syscall = enum tf_syscall TF_VFS_* */
	__u64 ino;              /* 0: not known at this hook (e.g. a path op seen at a syscall) */
	__u64 bytes_read;
	__u64 bytes_written;
	__u64 pos;              /* file position after the last read or write */
	__u64 arg;              /* open: f_flags; truncate: length; mkdir: mode; setattr: ia_valid
				 * (fentry) or the new mode/owner argument (tracepoint) */
	__u32 dev;              /* kernel dev_t of the file system (major << 20 | minor) */
	__u32 reads;
	__u32 writes;
	__u8 path_kind;         /* enum tf_path_kind of path */
	__u8 path2_kind;
	__u8 _pad[2];
	char fstype[16];
	struct tf_str path;     /* the file (rename: the old name; link: the existing file) */
	struct tf_str path2;    /* rename: the new name; link: the new name; symlink: target */
};

struct tf_filter {
	__u32 npids;
	__u32 ncomms;
	__u32 cgroup_filter;    /* nonzero: only cgroups whose tf_cgroups bits have this set */
	__u32 prefix_len;
	__u32 follow;           /* nonzero: pids also match every tgid in tf_follow for this set */
	__u32 _pad;
	__u32 pids[TF_FILTER_PIDS];
	char comms[TF_FILTER_COMMS][TF_COMM_LEN];
	char prefix[TF_PREFIX_MAX];
};

/* The single entry of tf_control: written by the agent, read first by every program. */
struct tf_control {
	__u64 enabled_bits;
	struct tf_filter filter[TF_SET_MAX];
	/* per set, changed by the agent at each detach: the attachment a syscall set's
	 * per-thread slot was taken under (syscall_event.bpf.h); a slot of an older one is
	 * free, its call already counted by the agent */
	__u32 epoch[TF_SET_MAX];
};

/* Load-time settings (.rodata), set by the agent before load. */
struct tf_config {
	__u32 agent_tgid;        /* never trace the agent itself */
	__u32 strategy;          /* enum tf_strategy of this object */
	__u64 wakeup_bytes;      /* wake the consumer once this much data is queued */
};

/* the record encoding relies on these */
_Static_assert(__builtin_offsetof(struct tf_str, data) == TF_STRH_SIZE, "tf_str head");
_Static_assert(sizeof(struct tf_exe_key) == 16, "tf_exe_key");
_Static_assert(__builtin_offsetof(struct tf_blob, data) == TF_STRH_SIZE, "tf_blob head");
_Static_assert(__builtin_offsetof(struct tf_exec_event, arg_len) -
		       __builtin_offsetof(struct tf_exec_event, argv_uptr) == TF_ARGVH_SIZE,
	       "argv head");

#endif /* __TRACEFLEET_EVENTS_H */
