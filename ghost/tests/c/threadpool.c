/* A thread pool with work in flight, for the multi-threaded checkpoint tests.
 *
 * threadpool LOG TASKS: 8 workers take tasks from a bounded queue (a mutex and two condition
 * variables); the main thread feeds it, sleeping between tasks (nanosleep), and one waiter
 * thread blocks in read() on a pipe that the main thread writes to when all is done. Each
 * result depends only on its task number, so the final RESULT line is the same whatever the
 * scheduling and however often the process was checkpointed and restarted. Every worker
 * notes gettid() when it starts and checks it after every task and at the end: the log
 * gets "TIDS OK" only if no thread ever saw its TID change. Workers are named worker-N
 * (for the check that thread names come back).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define WORKERS 8
#define QCAP 4

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t not_empty = PTHREAD_COND_INITIALIZER;
static pthread_cond_t not_full = PTHREAD_COND_INITIALIZER;
static int queue[QCAP], qhead, qlen, closed;
static uint64_t *results;
static int done, ntasks;
static volatile int tid_bad;
static FILE *logf;
static int wake[2];

static void logline(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logline(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfprintf(logf, fmt, ap);
    va_end(ap);
    fflush(logf);
}

/* Deterministic work: ~a few ms of integer mixing. */
static uint64_t work(int n) {
    uint64_t x = 0x9e3779b97f4a7c15ull * (uint64_t)(n + 1);
    for (int i = 0; i < 3000000; i++) {
        x ^= x >> 31;
        x *= 0xbf58476d1ce4e5b9ull;
        x ^= x << 7;
    }
    return x;
}

static void *worker(void *arg) {
    long w = (long)arg;
    pid_t mine = gettid();
    char name[16];
    snprintf(name, sizeof name, "worker-%ld", w);
    pthread_setname_np(pthread_self(), name);
    pthread_mutex_lock(&mu);
    logline("TID %ld %d\n", w, (int)mine);
    pthread_mutex_unlock(&mu);
    for (;;) {
        pthread_mutex_lock(&mu);
        while (qlen == 0 && !closed)
            pthread_cond_wait(&not_empty, &mu);
        if (qlen == 0 && closed) {
            pthread_mutex_unlock(&mu);
            break;
        }
        int n = queue[qhead];
        qhead = (qhead + 1) % QCAP;
        qlen--;
        pthread_cond_signal(&not_full);
        pthread_mutex_unlock(&mu);
        uint64_t r = work(n);
        if (gettid() != mine || pthread_self() == 0)
            tid_bad = 1;
        pthread_mutex_lock(&mu);
        results[n] = r;
        done++;
        if (done % 10 == 0)
            logline("DONE %d\n", done);
        pthread_mutex_unlock(&mu);
    }
    if (gettid() != mine)
        tid_bad = 1;
    return NULL;
}

static void *waiter(void *arg) {
    (void)arg;
    char c;
    /* Blocked in read() for the whole run: restarted after each restore. */
    while (read(wake[0], &c, 1) != 1)
        ;
    pthread_mutex_lock(&mu);
    logline("WOKEN\n");
    pthread_mutex_unlock(&mu);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: threadpool LOG TASKS\n");
        return 2;
    }
    logf = fopen(argv[1], "a");
    if (!logf)
        return 1;
    ntasks = atoi(argv[2]);
    results = calloc(ntasks, sizeof *results);
    if (!results || pipe(wake) != 0)
        return 1;
    pthread_t th[WORKERS], wt;
    for (long i = 0; i < WORKERS; i++)
        pthread_create(&th[i], NULL, worker, (void *)i);
    pthread_create(&wt, NULL, waiter, NULL);
    logline("STARTED %d\n", (int)getpid());
    for (int n = 0; n < ntasks; n++) {
        pthread_mutex_lock(&mu);
        while (qlen == QCAP)
            pthread_cond_wait(&not_full, &mu);
        queue[(qhead + qlen) % QCAP] = n;
        qlen++;
        pthread_cond_signal(&not_empty);
        pthread_mutex_unlock(&mu);
        struct timespec ts = {0, 5000000};
        nanosleep(&ts, NULL); /* EINTR after a restore is fine: just feed on */
    }
    pthread_mutex_lock(&mu);
    closed = 1;
    pthread_cond_broadcast(&not_empty);
    pthread_mutex_unlock(&mu);
    for (int i = 0; i < WORKERS; i++)
        pthread_join(th[i], NULL);
    if (write(wake[1], "x", 1) != 1)
        return 1;
    pthread_join(wt, NULL);
    uint64_t h = 1469598103934665603ull;
    for (int n = 0; n < ntasks; n++)
        h = (h ^ results[n]) * 1099511628211ull;
    logline("RESULT %d %016llx\n", done, (unsigned long long)h);
    logline(tid_bad ? "TIDS BAD\n" : "TIDS OK\n");
    return 0;
}
