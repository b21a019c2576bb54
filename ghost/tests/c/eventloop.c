/* Test program for event and timer fds: sets up what an event loop holds, logs "READY",
 * waits (doing nothing with them) until the file GO exists, then checks its own state and
 * logs one "OK name" or "BAD name: why" line per check and a last line "VERDICT ok" or
 * "VERDICT bad". Checkpointed and restarted in between, every check must still pass.
 *   eventloop LOG GO              as above
 *   eventloop LOG GO stale        also: an eventfd registered in the epoll fd, then dup'ed
 *                                 and closed (epoll keeps watching the file under its old
 *                                 number, which is no longer open)
 *   eventloop LOG GO inotify      also: an inotify fd (non-blocking) watching the directory of
 *                                 GO for IN_CREATE as watch 2 (watch 1, on /, removed);
 *                                 checked: creating GO is reported on watch 2, named "go"
 *   eventloop LOG GO inotify-unread  the same, with an event left unread in its queue
 * fds (in this order, after the log's): an eventfd holding 12345 (non-blocking, close-on-exec), a
 * semaphore eventfd holding 3 (non-blocking), a CLOCK_MONOTONIC timerfd due in 5 s then
 * every 1 s, a one-shot timerfd that already fired (one unread expiration, non-blocking), a
 * 100 ms periodic timerfd left unread (non-blocking, at least 4 expirations pending), an
 * absolute CLOCK_REALTIME timerfd due 30 s after setup, a signalfd for SIGUSR2 (blocked,
 * non-blocking), a pipe (read end non-blocking) holding "hello", an eventfd holding 1 and
 * an eventfd holding 0, and an epoll fd (close-on-exec) watching the pipe (level, data
 * 0xab01), the eventfd holding 1 (EPOLLET, data 0xab02) and the one holding 0
 * (EPOLLONESHOT, data 0xab03). The test sends SIGUSR2 before creating GO. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/inotify.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

static FILE *logf;
static int in = -1, in_wd = -1;
static int bad;

static void check(int ok, const char *name, const char *fmt, ...) {
    if (ok) {
        fprintf(logf, "OK %s\n", name);
    } else {
        va_list ap;
        va_start(ap, fmt);
        fprintf(logf, "BAD %s: ", name);
        vfprintf(logf, fmt, ap);
        fprintf(logf, "\n");
        va_end(ap);
        bad = 1;
    }
    fflush(logf);
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

/* Whether fd has O_NONBLOCK and FD_CLOEXEC as wanted. */
static void flags(int fd, const char *name, int nonblock, int cloexec) {
    int fl = fcntl(fd, F_GETFL), fdfl = fcntl(fd, F_GETFD);
    int nb = (fl & O_NONBLOCK) != 0, ce = (fdfl & FD_CLOEXEC) != 0;
    check(fl >= 0 && nb == nonblock && ce == cloexec, name, "O_NONBLOCK %d (want %d), FD_CLOEXEC %d (want %d)", nb,
          nonblock, ce, cloexec);
}

/* The ready data values epoll_wait reports now (timeout 0), as a bit set: 1 = 0xab01,
 * 2 = 0xab02, 4 = 0xab03; -1 on an unknown value. */
static int ready(int ep) {
    struct epoll_event ev[8];
    int n = epoll_wait(ep, ev, 8, 0), set = 0;
    for (int i = 0; i < n; i++) {
        if (ev[i].data.u64 >= 0xab01 && ev[i].data.u64 <= 0xab03)
            set |= 1 << (ev[i].data.u64 - 0xab01);
        else
            return -1;
    }
    return set;
}

/* Seconds until timerfd fd next expires (blocking on it, at most 10 s); -1 if it does not. */
static double wait_tick(int fd, uint64_t *ticks) {
    double t0 = now_s();
    struct pollfd p = {fd, POLLIN, 0};
    if (poll(&p, 1, 10000) != 1) return -1;
    if (read(fd, ticks, 8) != 8) return -1;
    return now_s() - t0;
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    const char *extra = argc > 3 ? argv[3] : "";
    logf = fopen(argv[1], "a");
    if (!logf) return 2;
    int ecount = eventfd(12345, EFD_NONBLOCK | EFD_CLOEXEC);
    int esem = eventfd(3, EFD_NONBLOCK | EFD_SEMAPHORE);
    int tper = timerfd_create(CLOCK_MONOTONIC, 0);
    struct itimerspec per = {{1, 0}, {5, 0}};
    timerfd_settime(tper, 0, &per, NULL);
    int tfired = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    struct itimerspec once = {{0, 0}, {0, 1000000}};
    timerfd_settime(tfired, 0, &once, NULL);
    int tmissed = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    struct itimerspec fast = {{0, 100000000}, {0, 10000000}};
    timerfd_settime(tmissed, 0, &fast, NULL);
    int tabs = timerfd_create(CLOCK_REALTIME, 0);
    struct timespec wall;
    clock_gettime(CLOCK_REALTIME, &wall);
    struct itimerspec abs = {{0, 0}, {wall.tv_sec + 30, wall.tv_nsec}};
    timerfd_settime(tabs, TFD_TIMER_ABSTIME, &abs, NULL);
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGUSR2);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    int sfd = signalfd(-1, &mask, SFD_NONBLOCK);
    int pp[2];
    pipe2(pp, 0);
    fcntl(pp[0], F_SETFL, O_NONBLOCK);
    write(pp[1], "hello", 5);
    int eet = eventfd(1, 0), eone = eventfd(0, 0);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {EPOLLIN, {.u64 = 0xab01}};
    epoll_ctl(ep, EPOLL_CTL_ADD, pp[0], &ev);
    ev = (struct epoll_event){EPOLLIN | EPOLLET, {.u64 = 0xab02}};
    epoll_ctl(ep, EPOLL_CTL_ADD, eet, &ev);
    ev = (struct epoll_event){EPOLLIN | EPOLLONESHOT, {.u64 = 0xab03}};
    epoll_ctl(ep, EPOLL_CTL_ADD, eone, &ev);
    if (ep < 0 || eone < 0 || sfd < 0 || tabs < 0) {
        fprintf(logf, "SETUP failed\n");
        return 2;
    }
    if (strcmp(extra, "stale") == 0) {
        int gone = eventfd(0, 0);
        ev = (struct epoll_event){EPOLLIN, {.u64 = 0xdead}};
        epoll_ctl(ep, EPOLL_CTL_ADD, gone, &ev);
        dup(gone);
        close(gone);
    } else if (strncmp(extra, "inotify", 7) == 0) {
        in = inotify_init1(IN_NONBLOCK);
        char dir[512], ignored[4096];
        snprintf(dir, sizeof dir, "%s", argv[2]);
        *strrchr(dir, '/') = 0;
        inotify_rm_watch(in, inotify_add_watch(in, "/", IN_CREATE));
        while (read(in, ignored, sizeof ignored) > 0) {
        }
        in_wd = inotify_add_watch(in, dir, IN_CREATE);
        if (strcmp(extra, "inotify-unread") == 0) {
            char unread[600];
            snprintf(unread, sizeof unread, "%s/unread", dir);
            close(open(unread, O_CREAT | O_WRONLY, 0600));
        }
    }
    usleep(350000); /* tfired fires, tmissed expires 4 times unread */
    fprintf(logf, "READY\n");
    fflush(logf);
    while (access(argv[2], F_OK) != 0) usleep(20000);

    /* eventfd: the same count, semaphore mode, flags. */
    uint64_t v = 0;
    check(read(ecount, &v, 8) == 8 && v == 12345, "eventfd-count", "read %llu", (unsigned long long)v);
    flags(ecount, "eventfd-flags", 1, 1);
    int sem_ok = 1;
    for (int i = 0; i < 3; i++) {
        v = 0;
        if (read(esem, &v, 8) != 8 || v != 1) sem_ok = 0;
    }
    check(sem_ok && read(esem, &v, 8) < 0 && errno == EAGAIN, "eventfd-semaphore",
          "three reads of 1 then EAGAIN expected");
    flags(esem, "eventfd-semaphore-flags", 1, 0);

    /* signalfd: SIGUSR2, sent by the test while blocked, is read from it. */
    struct signalfd_siginfo si;
    memset(&si, 0, sizeof si);
    ssize_t n = read(sfd, &si, sizeof si);
    check(n == sizeof si && si.ssi_signo == SIGUSR2, "signalfd", "read %zd, signal %u", n, si.ssi_signo);
    flags(sfd, "signalfd-flags", 1, 0);

    /* epoll: same set, data, ET and oneshot behaviour. */
    int r = ready(ep);
    check(r == 3, "epoll-ready", "ready set %d, want pipe and ET eventfd (3)", r);
    r = ready(ep);
    check(r == 1, "epoll-edge", "ready set %d on a second wait, want only the level-triggered pipe (1)", r);
    v = 1;
    write(eone, &v, 8);
    r = ready(ep);
    check(r == 5, "epoll-oneshot-fires", "ready set %d after writing the oneshot eventfd, want 5", r);
    r = ready(ep);
    check(r == 1, "epoll-oneshot-disabled", "ready set %d, want the oneshot one disabled (1)", r);
    ev = (struct epoll_event){EPOLLIN | EPOLLONESHOT, {.u64 = 0xab03}};
    check(epoll_ctl(ep, EPOLL_CTL_MOD, eone, &ev) == 0 && ready(ep) == 5, "epoll-mod",
          "EPOLL_CTL_MOD of the oneshot fd re-arms it (%s)", strerror(errno));
    write(eet, &v, 8);
    r = ready(ep);
    check(r == 3, "epoll-edge-again", "ready set %d after writing the ET eventfd, want 3", r);
    flags(ep, "epoll-flags", 0, 1);
    char buf[8] = {0};
    check(read(pp[0], buf, sizeof buf) == 5 && memcmp(buf, "hello", 5) == 0, "pipe", "read %s", buf);

    /* timerfd: the fired one-shot's expiration is there; the absolute one keeps its expiry
     * and flags; the periodic one fires within its time left, then at its interval. */
    v = 0;
    check(read(tfired, &v, 8) == 8 && v == 1, "timerfd-pending", "read %llu (%s)", (unsigned long long)v,
          strerror(errno));
    v = 0;
    check(read(tmissed, &v, 8) == 8 && v >= 4, "timerfd-missed",
          "read %llu expirations of a 100 ms timer left unread 350 ms, want 4 or more", (unsigned long long)v);
    uint64_t mt = 0;
    double again = wait_tick(tmissed, &mt);
    check(again >= 0 && again < 0.5, "timerfd-missed-period", "fired %.2f s later, want within 0.5 s", again);
    struct itimerspec cur;
    timerfd_gettime(tabs, &cur);
    check(cur.it_value.tv_sec > 0 && cur.it_value.tv_sec < 30 && cur.it_interval.tv_sec == 0, "timerfd-absolute",
          "%lld s left, want 1-29", (long long)cur.it_value.tv_sec);
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/self/fdinfo/%d", tabs);
    FILE *fi = fopen(path, "r");
    int absflag = 0;
    while (fi && fgets(line, sizeof line, fi))
        if (strcmp(line, "settime flags: 01\n") == 0) absflag = 1;
    if (fi) fclose(fi);
    check(absflag, "timerfd-absolute-flags", "settime flags not TFD_TIMER_ABSTIME");
    timerfd_gettime(tper, &cur);
    check(cur.it_interval.tv_sec == 1 && cur.it_interval.tv_nsec == 0, "timerfd-interval", "interval %lld.%09ld",
          (long long)cur.it_interval.tv_sec, cur.it_interval.tv_nsec);
    uint64_t ticks = 0;
    double first = wait_tick(tper, &ticks);
    check(first > 1.0 && first < 6.5 && ticks == 1, "timerfd-first", "fired after %.2f s with %llu ticks, want 1-6.5 s",
          first, (unsigned long long)ticks);
    double second = wait_tick(tper, &ticks);
    check(second > 0.5 && second < 2.0 && ticks == 1, "timerfd-period",
          "fired %.2f s later with %llu ticks, want 0.5-2 s", second, (unsigned long long)ticks);
    flags(tper, "timerfd-flags", 0, 0);
    flags(tfired, "timerfd-pending-flags", 1, 0);

    if (in >= 0) {
        char evbuf[4096] __attribute__((aligned(8)));
        struct pollfd p = {in, POLLIN, 0};
        ssize_t got = poll(&p, 1, 2000) == 1 ? read(in, evbuf, sizeof evbuf) : -1;
        struct inotify_event *ie = (struct inotify_event *)evbuf;
        check(in_wd == 2 && got >= (ssize_t)sizeof *ie && ie->wd == 2 && (ie->mask & IN_CREATE) && ie->len > 0 &&
                  strcmp(ie->name, "go") == 0,
              "inotify", "read %zd, wd %d (want 2), mask %#x, name %s", got, got > 0 ? ie->wd : -1,
              got > 0 ? ie->mask : 0, got > 0 && ie->len ? ie->name : "");
        flags(in, "inotify-flags", 1, 0);
    }
    fprintf(logf, "VERDICT %s\n", bad ? "bad" : "ok");
    fflush(logf);
    for (;;) pause();
}
