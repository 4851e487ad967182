/* Preloaded (LD_PRELOAD), makes the reads or writes of one file fail, as a failing or full disk
 * does, for tests/test_io_failures.py. The file: the one whose path contains $FAIL_NAME. Reads
 * (read, pread) of bytes from offset $FAIL_READS_FROM on, and before $FAIL_READS_UNTIL where
 * set, fail with EIO; writes (write, pwrite) of bytes from offset $FAIL_WRITES_FROM on fail
 * with the errno $FAIL_WRITES_ERRNO (ENOSPC where unset). Where $FAIL_FREE_BYTES is set, statvfs says
 * every file system has that many bytes free (a disk nearly full). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <sys/types.h>
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

/* -1 when this read or write of count bytes at offset goes on, else the errno it fails with */
static int failure(int fd, off_t offset, size_t count, int writing) {
    const char *from = getenv(writing ? "FAIL_WRITES_FROM" : "FAIL_READS_FROM");
    const char *until = writing ? NULL : getenv("FAIL_READS_UNTIL");
    const char *code = getenv("FAIL_WRITES_ERRNO");
    if (!from || offset < 0 || offset + (off_t)count <= atoll(from)
            || (until && offset >= atoll(until)) || !named(fd))
        return -1;
    return writing ? (code ? atoi(code) : ENOSPC) : EIO;
}

typedef ssize_t (*reading_at)(int, void *, size_t, off_t);
typedef ssize_t (*reading)(int, void *, size_t);
typedef ssize_t (*writing_at)(int, const void *, size_t, off_t);
typedef ssize_t (*writing)(int, const void *, size_t);

ssize_t pread(int fd, void *buf, size_t count, off_t offset) {
    static reading_at real;
    if (!real)
        real = (reading_at)dlsym(RTLD_NEXT, "pread");
    int code = failure(fd, offset, count, 0);
    if (code >= 0) {
        errno = code;
        return -1;
    }
    return real(fd, buf, count, offset);
}

ssize_t pread64(int fd, void *buf, size_t count, off_t offset) {
    return pread(fd, buf, count, offset);
}

ssize_t read(int fd, void *buf, size_t count) {
    static reading real;
    if (!real)
        real = (reading)dlsym(RTLD_NEXT, "read");
    int code = failure(fd, lseek(fd, 0, SEEK_CUR), count, 0);  /* -1: not seekable, never fails */
    if (code >= 0) {
        errno = code;
        return -1;
    }
    return real(fd, buf, count);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    static writing_at real;
    if (!real)
        real = (writing_at)dlsym(RTLD_NEXT, "pwrite");
    int code = failure(fd, offset, count, 1);
    if (code >= 0) {
        errno = code;
        return -1;
    }
    return real(fd, buf, count, offset);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t offset) {
    return pwrite(fd, buf, count, offset);
}

ssize_t write(int fd, const void *buf, size_t count) {
    static writing real;
    if (!real)
        real = (writing)dlsym(RTLD_NEXT, "write");
    int code = failure(fd, lseek(fd, 0, SEEK_CUR), count, 1);
    if (code >= 0) {
        errno = code;
        return -1;
    }
    return real(fd, buf, count);
}

typedef int (*stating)(const char *, struct statvfs *);

int statvfs(const char *path, struct statvfs *info) {
    static stating real;
    if (!real)
        real = (stating)dlsym(RTLD_NEXT, "statvfs");
    int result = real(path, info);
    const char *free = getenv("FAIL_FREE_BYTES");
    if (result == 0 && free)
        info->f_bavail = info->f_bfree = atoll(free) / info->f_frsize;
    return result;
}

int statvfs64(const char *path, struct statvfs64 *info) {
    return statvfs(path, (struct statvfs *)info);
}
