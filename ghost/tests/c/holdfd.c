/* Test program for checkpoint refusals: holds one resource at fd 5 and counts in a log.
 *   holdfd LOG inherited        fd 5 is given by the parent (a pipe or socketpair end)
 *   holdfd LOG tcp PORT         fd 5 is a TCP connection to 127.0.0.1:PORT
 *   holdfd LOG deleted PATH     fd 5 is PATH (mode 0640) opened read-write, written with 5000
 *                               'x' and "hello\n"; fd 6 is PATH opened again read-only at
 *                               offset 3; then PATH is unlinked
 *   holdfd LOG memfd            fd 5 is a memfd
 *   holdfd LOG child            a child process that sleeps (fd 5 is /dev/null)
 *   holdfd LOG thread           a second thread that sleeps (fd 5 is /dev/null)
 *   holdfd LOG cwd-gone DIR     works in DIR, which it removes (fd 5 is /dev/null)
 *   holdfd LOG lock PATH        fd 5 is PATH, write-locked with fcntl(F_SETLK)
 *   holdfd LOG timer            a POSIX timer (fd 5 is /dev/null)
 *   holdfd LOG sysv             attaches a System V shared memory segment (fd 5 /dev/null)
 *   holdfd LOG pipe-self        fd 5 is the write end of a pipe whose read end is fd 6
 *                               (non-blocking), 3000 lines "line NNNN\n" buffered in it
 *   holdfd LOG device PATH      fd 5 is PATH opened read-only (a device)
 * SIGUSR1: logs what fd 5 is now ("FD5 devnull" / "FD5 other" / "FD5 closed").
 * SIGUSR2: writes "ping\n" to fd 5 and logs "PING ok" or "PING failed".
 * SIGHUP: reads fd 6 until it is empty and logs "DRAIN <bytes> <ok|bad> <rest>": whether
 * the first 30000 bytes are the 3000 lines, and what follows them (newlines as '|'). */
#define _GNU_SOURCE /* memfd_create */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <time.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

static volatile sig_atomic_t usr1, usr2, hup;
static void on_usr1(int s) { (void)s; usr1++; }
static void on_usr2(int s) { (void)s; usr2++; }
static void on_hup(int s) { (void)s; hup++; }

static void drain(int log) {
    static char buf[1 << 20];
    ssize_t n = 0, r;
    while (n < (ssize_t)sizeof buf && (r = read(6, buf + n, sizeof buf - n)) > 0) n += r;
    int ok = n >= 30000;
    char line[16];
    for (int i = 0; ok && i < 3000; i++) {
        snprintf(line, sizeof line, "line %04d\n", i);
        ok = !memcmp(buf + i * 10, line, 10);
    }
    for (ssize_t i = 30000; i < n; i++)
        if (buf[i] == '\n') buf[i] = '|';
    dprintf(log, "DRAIN %zd %s %.*s\n", n, ok ? "ok" : "bad", n > 30000 ? (int)(n - 30000) : 0,
            buf + 30000);
}

static void *sleeper(void *arg) {
    (void)arg;
    for (;;) pause();
    return 0;
}

static int open_resource(const char *mode, const char *arg) {
    if (!strcmp(mode, "inherited")) return 5;
    int fd = -1;
    if (!strcmp(mode, "child")) {
        if (fork() == 0)
            for (;;) pause();
        mode = "device", arg = "/dev/null";
    } else if (!strcmp(mode, "thread")) {
        pthread_t t;
        if (pthread_create(&t, 0, sleeper, 0) != 0) return -1;
        mode = "device", arg = "/dev/null";
    } else if (!strcmp(mode, "cwd-gone")) {
        if (mkdir(arg, 0700) != 0 || chdir(arg) != 0 || rmdir(arg) != 0) return -1;
        mode = "device", arg = "/dev/null";
    } else if (!strcmp(mode, "lock")) {
        struct flock fl;
        memset(&fl, 0, sizeof fl);
        fl.l_type = F_WRLCK;
        fl.l_whence = SEEK_SET;
        /* Moved to fd 5 before locking: closing any fd of the file drops a POSIX lock. */
        fd = open(arg, O_RDWR | O_CREAT, 0600);
        if (fd < 0 || (fd != 5 && (dup2(fd, 5) != 5 || close(fd) != 0))) return -1;
        if (fcntl(5, F_SETLK, &fl) != 0) return -1;
        return 5;
    } else if (!strcmp(mode, "timer")) {
        timer_t t;
        struct sigevent ev;
        memset(&ev, 0, sizeof ev);
        ev.sigev_notify = SIGEV_NONE;
        if (timer_create(CLOCK_MONOTONIC, &ev, &t) != 0) return -1;
        mode = "device", arg = "/dev/null";
    } else if (!strcmp(mode, "sysv")) {
        int id = shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0600);
        if (id < 0 || shmat(id, 0, 0) == (void *)-1) return -1;
        shmctl(id, IPC_RMID, 0); /* gone once detached: nothing left behind by the test */
        mode = "device", arg = "/dev/null";
    }
    if (!strcmp(mode, "tcp")) {
        fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a;
        memset(&a, 0, sizeof a);
        a.sin_family = AF_INET;
        a.sin_port = htons(atoi(arg));
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) return -1;
    } else if (!strcmp(mode, "deleted")) {
        char xs[5000];
        memset(xs, 'x', sizeof xs);
        fd = open(arg, O_RDWR | O_CREAT | O_TRUNC, 0640);
        if (fd < 0 || fchmod(fd, 0640) != 0 || write(fd, xs, sizeof xs) != sizeof xs ||
            write(fd, "hello\n", 6) != 6)
            return -1;
        int again = open(arg, O_RDONLY);
        if (again < 0 || lseek(again, 3, SEEK_SET) != 3 || dup2(again, 6) != 6 || unlink(arg) != 0)
            return -1;
        if (again != 6) close(again);
    } else if (!strcmp(mode, "pipe-self")) {
        int p[2];
        char line[16];
        if (pipe(p) != 0 || dup2(p[1], 5) != 5 || dup2(p[0], 6) != 6) return -1;
        if (p[0] != 5 && p[0] != 6) close(p[0]);
        if (p[1] != 5 && p[1] != 6) close(p[1]);
        for (int i = 0; i < 3000; i++) {
            snprintf(line, sizeof line, "line %04d\n", i);
            if (write(5, line, 10) != 10) return -1;
        }
        if (fcntl(6, F_SETFL, O_NONBLOCK) != 0) return -1;
        return 5;
    } else if (!strcmp(mode, "memfd")) {
        fd = memfd_create("holdfd", 0);
        if (fd < 0 || write(fd, "hello\n", 6) != 6) return -1;
    } else if (!strcmp(mode, "device")) {
        fd = open(arg, O_RDONLY);
    }
    if (fd < 0) return -1;
    if (fd != 5 && (dup2(fd, 5) != 5 || close(fd) != 0)) return -1;
    return 5;
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    int log = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (log < 0) return 2;
    if (open_resource(argv[2], argc > 3 ? argv[3] : "") != 5) {
        dprintf(log, "SETUP failed: %s\n", strerror(errno));
        return 3;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, 0);
    sa.sa_handler = on_usr2;
    sigaction(SIGUSR2, &sa, 0);
    sa.sa_handler = on_hup;
    sigaction(SIGHUP, &sa, 0);
    int seen1 = 0, seen2 = 0, seen_hup = 0;
    for (unsigned long counter = 1;; counter++) {
        dprintf(log, "%lu\n", counter);
        if (usr1 != seen1) {
            seen1 = usr1;
            struct stat st;
            if (fstat(5, &st) != 0)
                dprintf(log, "FD5 closed\n");
            else if (S_ISCHR(st.st_mode) && st.st_rdev == makedev(1, 3))
                dprintf(log, "FD5 devnull\n");
            else
                dprintf(log, "FD5 other mode %o nlink %lu\n", st.st_mode, (unsigned long)st.st_nlink);
        }
        if (hup != seen_hup) {
            seen_hup = hup;
            drain(log);
        }
        if (usr2 != seen2) {
            seen2 = usr2;
            if (write(5, "ping\n", 5) == 5)
                dprintf(log, "PING ok\n");
            else
                dprintf(log, "PING failed: %s\n", strerror(errno));
        }
        usleep(5000);
    }
}
