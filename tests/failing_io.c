/* Preloaded (LD_PRELOAD), makes the reads or writes of one file fail, as a failing or full disk
 * does, for tests/test_io_failures.py. The file: the one whose path contains $FAIL_NAME. Reads
 * (read, pread, preadv, preadv2) of bytes from offset $FAIL_READS_FROM on, and before $FAIL_READS_UNTIL where
 * set, fail with EIO; writes (write, pwrite) of bytes from offset $FAIL_WRITES_FROM on fail
 * with the errno $FAIL_WRITES_ERRNO (ENOSPC where unset). Where $FAIL_FREE_BYTES is set,
 * statvfs (of a path) says its file system has that many bytes free (a disk nearly full). */
#undef _FILE_OFFSET_BITS  /* pread and pread64 below are two symbols: define each once */
#define _GNU_SOURCE
#define _LARGEFILE64_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static int named(int fd) {
    const char *name = getenv("FAIL_NAME");
    char link[64], path[4096];
    if (!name)
        return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t length = readlink(link, path, sizeof path - 1);
    if (length < 0)
        return 0;
    path[length] = '\0';
    return strstr(path, name) != NULL;
}

/* -1 when this read or write of count bytes at offset (-1: at the descriptor's position) goes
 * on, else the errno it fails with */
static int failure(int fd, off64_t offset, size_t count, int writing) {
    const char *from = getenv(writing ? "FAIL_WRITES_FROM" : "FAIL_READS_FROM");
    const char *until = writing ? NULL : getenv("FAIL_READS_UNTIL");
    const char *code = getenv("FAIL_WRITES_ERRNO");
    if (!from || !named(fd))
        return -1;
    if (offset < 0) {
        int saved = errno;
        offset = lseek64(fd, 0, SEEK_CUR);  /* -1 where not seekable: never fails */
        errno = saved;
    }
    if (offset < 0 || offset + (off64_t)count <= atoll(from) || (until && offset >= atoll(until)))
        return -1;
    return writing ? (code ? atoi(code) : ENOSPC) : EIO;
}

/* Each call and its 64-bit twin (the same on 64-bit Linux, two symbols either way) */
#define FAILING(name, type, buffer)                                                      \
    ssize_t name(int fd, buffer buf, size_t count, type offset) {                       \
        static ssize_t (*real)(int, buffer, size_t, type);                              \
        if (!real)                                                                        \
            real = (ssize_t (*)(int, buffer, size_t, type))dlsym(RTLD_NEXT, #name);       \
        int code = failure(fd, offset, count, WRITING);                                  \
        if (code >= 0) {                                                                  \
            errno = code;                                                                 \
            return -1;                                                                    \
        }                                                                                 \
        return real(fd, buf, count, offset);                                              \
    }

#define WRITING 0
FAILING(pread, off_t, void *)
FAILING(pread64, off64_t, void *)
#undef WRITING
#define WRITING 1
FAILING(pwrite, off_t, const void *)
FAILING(pwrite64, off64_t, const void *)
#undef WRITING

/* Whether a vectored read at offset fails (errno set) */
static int vector_fails(int fd, const struct iovec *iov, int iovcnt, off64_t offset) {
    size_t count = 0;
    for (int i = 0; i < iovcnt; i++)
        count += iov[i].iov_len;
    int code = failure(fd, offset, count, 0);
    if (code >= 0)
        errno = code;
    return code >= 0;
}

#define FAILING_V(name, type)                                                             \
    ssize_t name(int fd, const struct iovec *iov, int iovcnt, type offset) {              \
        static ssize_t (*real)(int, const struct iovec *, int, type);                     \
        if (!real)                                                                        \
            real = (ssize_t (*)(int, const struct iovec *, int, type))dlsym(RTLD_NEXT, #name); \
        return vector_fails(fd, iov, iovcnt, offset) ? -1 : real(fd, iov, iovcnt, offset);  \
    }

FAILING_V(preadv, off_t)
FAILING_V(preadv64, off64_t)

/* preadv2: Python's os.preadv */
#define FAILING_V2(name, type)                                                            \
    ssize_t name(int fd, const struct iovec *iov, int iovcnt, type offset, int flags) {   \
        static ssize_t (*real)(int, const struct iovec *, int, type, int);                \
        if (!real)                                                                        \
            real = (ssize_t (*)(int, const struct iovec *, int, type, int))dlsym(         \
                RTLD_NEXT, #name);                                                        \
        return vector_fails(fd, iov, iovcnt, offset) ? -1                                 \
                                                     : real(fd, iov, iovcnt, offset, flags); \
    }

FAILING_V2(preadv2, off_t)
FAILING_V2(preadv64v2, off64_t)

ssize_t read(int fd, void *buf, size_t count) {
    static ssize_t (*real)(int, void *, size_t);
    if (!real)
        real = (ssize_t (*)(int, void *, size_t))dlsym(RTLD_NEXT, "read");
    int code = failure(fd, -1, count, 0);
    if (code >= 0) {
        errno = code;
        return -1;
    }
    return real(fd, buf, count);
}

ssize_t write(int fd, const void *buf, size_t count) {
    static ssize_t (*real)(int, const void *, size_t);
    if (!real)
        real = (ssize_t (*)(int, const void *, size_t))dlsym(RTLD_NEXT, "write");
    int code = failure(fd, -1, count, 1);
    if (code >= 0) {
        errno = code;
        return -1;
    }
    return real(fd, buf, count);
}

#define STATING(name, type)                                                               \
    int name(const char *path, struct type *info) {                                       \
        static int (*real)(const char *, struct type *);                                  \
        if (!real)                                                                        \
            real = (int (*)(const char *, struct type *))dlsym(RTLD_NEXT, #name);         \
        int result = real(path, info);                                                    \
        const char *free = getenv("FAIL_FREE_BYTES");                                     \
        if (result == 0 && free && info->f_frsize)                                        \
            info->f_bavail = info->f_bfree = atoll(free) / info->f_frsize;                \
        return result;                                                                    \
    }

STATING(statvfs, statvfs)
STATING(statvfs64, statvfs64)
