/* Test program for sockets across a checkpoint and restart.
 *   sockets LOG serve PORT PATH NAME
 *     fd 3: TCP listener on 127.0.0.1:PORT (no SO_REUSEADDR, backlog 7, non-blocking)
 *     fd 4: TCP listener on [::1]:PORT (IPV6_V6ONLY, SO_REUSEPORT, SO_REUSEADDR, backlog 3,
 *     close-on-exec)
 *     fd 5: UDP socket bound to 127.0.0.1:PORT (non-blocking)
 *     fd 6: Unix stream listener at PATH (mode 0660)
 *     fd 7: Unix seqpacket listener on the abstract name NAME
 *     fd 8, 9: a seqpacket socketpair; fd 10, 11: a stream socketpair; fd 12, 13: a
 *     datagram socketpair (12 non-blocking). In each pair three messages of different sizes
 *     are queued in each direction. fd 14 is a dup of fd 3, fd 15 of fd 9.
 *     Logs READY, then waits for SIGUSR1; then checks every address (getsockname), option
 *     and flag, reads the queued messages (in order, intact, boundaries kept, nothing more),
 *     logs ACCEPTING, accepts one connection on each listener and a datagram on the UDP
 *     socket (the test sends them), logging one "OK name" or "BAD name: why" line per check
 *     and a last line "VERDICT ok" or "VERDICT bad".
 *   sockets LOG refuse PORT PATH LPORT
 *     fd 3: a TCP connection to 127.0.0.1:PORT; fd 4: a Unix stream connection to PATH (both
 *     the test's listeners); fd 5: a TCP listener on 127.0.0.1:LPORT, left unaccepted; fds 6,
 *     7: a seqpacket socketpair with three messages queued each way.
 *     Logs READY; on SIGUSR1 writes "ping\n" to fds 3 and 4 and logs "PING ok" (or failed),
 *     the first time also reads the socketpair's queues (as serve does) and logs
 *     "QUEUES ok" or "QUEUES bad". */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

static FILE *logf;
static int bad;
static volatile sig_atomic_t go;

static void on_usr1(int s) {
    (void)s;
    go = 1;
}

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

static void die(const char *what) {
    fprintf(logf, "SETUP %s: %s\n", what, strerror(errno));
    fflush(logf);
    exit(1);
}

/* Puts socket s at fd `at`. */
static void place(int s, int at) {
    if (s != at) {
        if (dup2(s, at) < 0)
            die("dup2");
        close(s);
    }
}

static int opt(int fd, int level, int name) {
    int v = -1;
    socklen_t l = sizeof v;
    if (getsockopt(fd, level, name, &v, &l) != 0)
        return -1;
    return v;
}

static void flags(int fd, const char *name, int nonblock, int cloexec) {
    int nb = (fcntl(fd, F_GETFL) & O_NONBLOCK) != 0, ce = (fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0;
    check(nb == nonblock && ce == cloexec, name, "O_NONBLOCK %d (want %d), FD_CLOEXEC %d (want %d)", nb, nonblock,
          ce, cloexec);
}

static struct sockaddr_storage names[8];
static socklen_t name_lens[8];

static void save_name(int fd) {
    name_lens[fd] = sizeof names[fd];
    getsockname(fd, (struct sockaddr *)&names[fd], &name_lens[fd]);
}

static void same_name(int fd, const char *name) {
    struct sockaddr_storage now;
    socklen_t l = sizeof now;
    int r = getsockname(fd, (struct sockaddr *)&now, &l);
    check(r == 0 && l == name_lens[fd] && memcmp(&now, &names[fd], l) == 0, name,
          "getsockname gives another address (length %u, was %u)", l, name_lens[fd]);
}

static const char *msgs[2][3] = {{"first", "second message, longer", "3"},
                                 {"reply one", "r2", "the third and last reply, the longest of all"}};

/* Queues msgs[0] from a to b and msgs[1] from b to a. */
static void fill(int a, int b) {
    for (int i = 0; i < 3; i++) {
        if (send(a, msgs[0][i], strlen(msgs[0][i]), 0) < 0 || send(b, msgs[1][i], strlen(msgs[1][i]), 0) < 0)
            die("send");
    }
}

/* Reads what fd holds (msgs[dir]): one message per recv for datagrams, the concatenation for
 * a stream; then nothing more must be there. */
static void drain(int fd, int dir, int stream, const char *name) {
    char buf[256], want[256] = "";
    int ok = 1;
    if (stream) {
        for (int i = 0; i < 3; i++)
            strcat(want, msgs[dir][i]);
        size_t got = 0;
        while (got < strlen(want)) {
            ssize_t n = recv(fd, buf + got, sizeof buf - got, MSG_DONTWAIT);
            if (n <= 0)
                break;
            got += n;
        }
        buf[got] = 0;
        ok = got == strlen(want) && strcmp(buf, want) == 0;
        if (!ok)
            check(0, name, "stream holds \"%s\", want \"%s\"", buf, want);
    } else {
        for (int i = 0; i < 3 && ok; i++) {
            ssize_t n = recv(fd, buf, sizeof buf - 1, MSG_DONTWAIT);
            buf[n < 0 ? 0 : n] = 0;
            ok = n == (ssize_t)strlen(msgs[dir][i]) && strcmp(buf, msgs[dir][i]) == 0;
            if (!ok)
                check(0, name, "message %d is \"%s\" (%zd bytes), want \"%s\"", i, buf, n, msgs[dir][i]);
        }
    }
    if (ok) {
        ssize_t n = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
        ok = n < 0 && errno == EAGAIN;
        check(ok, name, "more is queued after the messages (%zd bytes)", n);
    }
}

static int listen_on(int family, int type, const void *addr, socklen_t len, int backlog) {
    int s = socket(family, type, 0);
    if (s < 0)
        die("socket");
    int one = 1;
    if (family == AF_INET6) {
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
        setsockopt(s, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    }
    if (bind(s, addr, len) != 0)
        die("bind");
    if (backlog && listen(s, backlog) != 0)
        die("listen");
    return s;
}

/* Waits up to 20 s for fd to be readable. */
static int readable(int fd) {
    struct pollfd p = {fd, POLLIN, 0};
    return poll(&p, 1, 20000) == 1;
}

static void accept_one(int fd, const char *name) {
    int ok = readable(fd);
    int c = ok ? accept(fd, NULL, NULL) : -1;
    char b[8] = "";
    ssize_t n = c >= 0 && readable(c) ? recv(c, b, sizeof b - 1, 0) : -1;
    check(c >= 0 && n == 2 && memcmp(b, "hi", 2) == 0, name, "accept %d, read %zd: %s", c, n, strerror(errno));
    if (c >= 0)
        close(c);
}

static int serve(int port, const char *path, const char *aname) {
    struct sockaddr_in a4 = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &a4.sin_addr);
    struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_port = htons(port)};
    inet_pton(AF_INET6, "::1", &a6.sin6_addr);
    struct sockaddr_un up = {.sun_family = AF_UNIX}, ua = {.sun_family = AF_UNIX};
    strncpy(up.sun_path, path, sizeof up.sun_path - 1);
    size_t alen = strlen(aname);
    memcpy(ua.sun_path + 1, aname, alen);
    socklen_t ualen = offsetof(struct sockaddr_un, sun_path) + 1 + alen;

    place(listen_on(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, &a4, sizeof a4, 7), 3);
    place(listen_on(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, &a6, sizeof a6, 3), 4);
    place(listen_on(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, &a4, sizeof a4, 0), 5);
    unlink(path);
    place(listen_on(AF_UNIX, SOCK_STREAM, &up, sizeof up, 5), 6);
    chmod(path, 0660);
    place(listen_on(AF_UNIX, SOCK_SEQPACKET, &ua, ualen, 4), 7);
    int types[3] = {SOCK_SEQPACKET, SOCK_STREAM, SOCK_DGRAM};
    for (int i = 0; i < 3; i++) {
        int sv[2];
        if (socketpair(AF_UNIX, types[i], 0, sv) != 0)
            die("socketpair");
        place(sv[0], 8 + 2 * i);
        place(sv[1], 9 + 2 * i);
        fill(8 + 2 * i, 9 + 2 * i);
    }
    fcntl(12, F_SETFL, O_NONBLOCK);
    if (dup2(3, 14) != 14 || dup2(9, 15) != 15)
        die("dup2");
    for (int fd = 3; fd <= 7; fd++)
        save_name(fd);
    fprintf(logf, "READY\n");
    fflush(logf);
    while (!go)
        usleep(20000);

    same_name(3, "tcp4 address");
    same_name(4, "tcp6 address");
    same_name(5, "udp address");
    same_name(6, "unix path address");
    same_name(7, "unix abstract address");
    check(opt(3, SOL_SOCKET, SO_REUSEADDR) == 0 && opt(3, SOL_SOCKET, SO_ACCEPTCONN) == 1, "tcp4 options",
          "SO_REUSEADDR %d SO_ACCEPTCONN %d", opt(3, SOL_SOCKET, SO_REUSEADDR), opt(3, SOL_SOCKET, SO_ACCEPTCONN));
    check(opt(4, IPPROTO_IPV6, IPV6_V6ONLY) == 1 && opt(4, SOL_SOCKET, SO_REUSEPORT) == 1 &&
              opt(4, SOL_SOCKET, SO_REUSEADDR) == 1,
          "tcp6 options", "V6ONLY %d REUSEPORT %d REUSEADDR %d", opt(4, IPPROTO_IPV6, IPV6_V6ONLY),
          opt(4, SOL_SOCKET, SO_REUSEPORT), opt(4, SOL_SOCKET, SO_REUSEADDR));
    check(opt(5, SOL_SOCKET, SO_TYPE) == SOCK_DGRAM, "udp type", "SO_TYPE %d", opt(5, SOL_SOCKET, SO_TYPE));
    check(opt(7, SOL_SOCKET, SO_TYPE) == SOCK_SEQPACKET && opt(7, SOL_SOCKET, SO_ACCEPTCONN) == 1,
          "abstract listener type", "SO_TYPE %d", opt(7, SOL_SOCKET, SO_TYPE));
    struct stat st;
    check(stat(path, &st) == 0 && S_ISSOCK(st.st_mode) && (st.st_mode & 0777) == 0660, "unix path file",
          "mode %o", st.st_mode);
    struct stat s3, s14, s9, s15;
    check(fstat(3, &s3) == 0 && fstat(14, &s14) == 0 && s3.st_ino == s14.st_ino, "dup of tcp4 listener",
          "fd 14 is another socket than fd 3");
    check(fstat(9, &s9) == 0 && fstat(15, &s15) == 0 && s9.st_ino == s15.st_ino, "dup of socketpair end",
          "fd 15 is another socket than fd 9");
    flags(3, "tcp4 flags", 1, 0);
    flags(4, "tcp6 flags", 0, 1);
    flags(5, "udp flags", 1, 0);
    flags(8, "seqpacket flags", 0, 0);
    flags(12, "dgram flags", 1, 0);
    const char *pn[3] = {"seqpacket", "stream", "dgram"};
    for (int i = 0; i < 3; i++) {
        char n[64];
        check(opt(8 + 2 * i, SOL_SOCKET, SO_TYPE) == types[i], pn[i], "SO_TYPE %d", opt(8 + 2 * i, SOL_SOCKET, SO_TYPE));
        snprintf(n, sizeof n, "%s a->b", pn[i]);
        drain(9 + 2 * i, 0, types[i] == SOCK_STREAM, n);
        snprintf(n, sizeof n, "%s b->a", pn[i]);
        drain(8 + 2 * i, 1, types[i] == SOCK_STREAM, n);
        /* Still a pair: a message sent now arrives on the other end. */
        snprintf(n, sizeof n, "%s still connected", pn[i]);
        char b[8] = "";
        ssize_t w = send(8 + 2 * i, "new", 3, 0);
        ssize_t r = readable(9 + 2 * i) ? recv(9 + 2 * i, b, sizeof b, 0) : -1;
        check(w == 3 && r == 3 && memcmp(b, "new", 3) == 0, n, "send %zd recv %zd", w, r);
    }
    fprintf(logf, "ACCEPTING\n");
    fflush(logf);
    accept_one(3, "accept tcp4");
    accept_one(4, "accept tcp6");
    accept_one(6, "accept unix path");
    accept_one(7, "accept unix abstract");
    char b[8] = "";
    ssize_t n = readable(5) ? recv(5, b, sizeof b, 0) : -1;
    check(n == 2 && memcmp(b, "hi", 2) == 0, "udp datagram", "recv %zd", n);
    fprintf(logf, "VERDICT %s\n", bad ? "bad" : "ok");
    fflush(logf);
    for (;;)
        pause();
}

static int refuse(int port, const char *path, int lport) {
    struct sockaddr_in a4 = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &a4.sin_addr);
    int t = socket(AF_INET, SOCK_STREAM, 0);
    if (t < 0 || connect(t, (struct sockaddr *)&a4, sizeof a4) != 0)
        die("connect tcp");
    place(t, 3);
    struct sockaddr_un up = {.sun_family = AF_UNIX};
    strncpy(up.sun_path, path, sizeof up.sun_path - 1);
    int u = socket(AF_UNIX, SOCK_STREAM, 0);
    if (u < 0 || connect(u, (struct sockaddr *)&up, sizeof up) != 0)
        die("connect unix");
    place(u, 4);
    a4.sin_port = htons(lport);
    place(listen_on(AF_INET, SOCK_STREAM, &a4, sizeof a4, 4), 5);
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv) != 0)
        die("socketpair");
    place(sv[0], 6);
    place(sv[1], 7);
    fill(6, 7);
    int drained = 0;
    fprintf(logf, "READY\n");
    fflush(logf);
    for (;;) {
        while (!go)
            usleep(20000);
        go = 0;
        int ok = write(3, "ping\n", 5) == 5 && write(4, "ping\n", 5) == 5;
        fprintf(logf, "PING %s\n", ok ? "ok" : "failed");
        if (!drained) {
            drained = 1;
            drain(7, 0, 0, "seqpacket a->b");
            drain(6, 1, 0, "seqpacket b->a");
            fprintf(logf, "QUEUES %s\n", bad ? "bad" : "ok");
        }
        fflush(logf);
    }
}

int main(int argc, char **argv) {
    if (argc < 6)
        return 2;
    int fd = open(argv[1], O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    /* The log sits above the sockets' numbers. */
    if (fd < 0 || dup3(fd, 20, O_CLOEXEC) < 0)
        return 3;
    close(fd);
    logf = fdopen(20, "a");
    signal(SIGUSR1, on_usr1);
    if (strcmp(argv[2], "serve") == 0)
        return serve(atoi(argv[3]), argv[4], argv[5]);
    return refuse(atoi(argv[3]), argv[4], atoi(argv[5]));
}
