/* Test program for `krg ipc` and `krg checkpoint --ipc`: System V IPC objects with known
 * contents, and a canonical dump of them to compare before a checkpoint and after a restart.
 *
 *   sysv_ipc create KEY          a message queue (key KEY, mode 0640, msg_qbytes 16000, 7
 *                                messages of types 5 1 9 1 3 2 7 and sizes 1 0 100 4000 8192
 *                                17 300), a semaphore array (key KEY+1, mode 0604, values
 *                                0 1 2 100 32767 7) and a shared memory segment (key KEY+2,
 *                                mode 0660, 8 MiB + 100 bytes, a pattern in pages 0 3 4 5
 *                                1000 2047 and in its last byte, page 7 written with zeros),
 *                                all owned by 65534:65534; prints "MSG id", "SEM id", "SHM id"
 *   sysv_ipc dump MSG SEM SHM    prints every field a restart keeps (an id of -1 is skipped);
 *                                messages are read with MSG_COPY, so the queue is untouched.
 *                                The MSGTIMES line holds what a checkpoint must not change
 *                                but a restart cannot keep (times, pids)
 *   sysv_ipc drain MSG           receives every message (msgrcv type 0, queue order) and
 *                                prints each as dump does
 *   sysv_ipc worker MSG SEM LOG  logs "READY", then on each SIGUSR1 receives one message and
 *                                takes one unit of semaphore 3 (IPC_NOWAIT), logging
 *                                "GOT type=T len=N sum=S semop=RC sem3=VALUE" (or "GOT none
 *                                errno=E ...")
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <unistd.h>

#ifndef MSG_COPY
#define MSG_COPY 040000
#endif

#define SHM_SIZE ((8 << 20) + 100)

static const long types[] = {5, 1, 9, 1, 3, 2, 7};
static const size_t sizes[] = {1, 0, 100, 4000, 8192, 17, 300};
static const unsigned short sems[] = {0, 1, 2, 100, 32767, 7};
static const int pages[] = {0, 3, 4, 5, 1000, 2047};

static struct {
    long mtype;
    char mtext[65536];
} m;

static void die(const char *what) {
    perror(what);
    exit(1);
}

static unsigned fnv(const unsigned char *p, size_t n) {
    unsigned h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 16777619u;
    return h;
}

static int create(key_t key) {
    int q = msgget(key, IPC_CREAT | IPC_EXCL | 0640);
    if (q < 0) die("msgget");
    struct msqid_ds qd;
    if (msgctl(q, IPC_STAT, &qd)) die("msgctl IPC_STAT");
    qd.msg_qbytes = 16000;
    qd.msg_perm.uid = 65534;
    qd.msg_perm.gid = 65534;
    if (msgctl(q, IPC_SET, &qd)) die("msgctl IPC_SET");
    for (int i = 0; i < 7; i++) {
        m.mtype = types[i];
        for (size_t j = 0; j < sizes[i]; j++) m.mtext[j] = (char)(i * 31 + j * 7 + types[i]);
        if (msgsnd(q, &m, sizes[i], IPC_NOWAIT)) die("msgsnd");
    }

    int s = semget(key + 1, 6, IPC_CREAT | IPC_EXCL | 0604);
    if (s < 0) die("semget");
    unsigned short vals[6];
    memcpy(vals, sems, sizeof vals);
    if (semctl(s, 0, SETALL, vals)) die("semctl SETALL");
    struct semid_ds sd;
    if (semctl(s, 0, IPC_STAT, &sd)) die("semctl IPC_STAT");
    sd.sem_perm.uid = 65534;
    sd.sem_perm.gid = 65534;
    if (semctl(s, 0, IPC_SET, &sd)) die("semctl IPC_SET");

    int h = shmget(key + 2, SHM_SIZE, IPC_CREAT | IPC_EXCL | 0660);
    if (h < 0) die("shmget");
    unsigned char *p = shmat(h, 0, 0);
    if (p == (void *)-1) die("shmat");
    for (int i = 0; i < 6; i++)
        for (int j = 0; j < 4096; j++) p[pages[i] * 4096 + j] = (unsigned char)(pages[i] * 13 + j * 3 + 1);
    memset(p + 7 * 4096, 0, 4096);
    p[SHM_SIZE - 1] = 0x5a;
    shmdt(p);
    struct shmid_ds hd;
    if (shmctl(h, IPC_STAT, &hd)) die("shmctl IPC_STAT");
    hd.shm_perm.uid = 65534;
    hd.shm_perm.gid = 65534;
    if (shmctl(h, IPC_SET, &hd)) die("shmctl IPC_SET");
    printf("MSG %d\nSEM %d\nSHM %d\n", q, s, h);
    return 0;
}

static void print_msg(FILE *out, const char *tag, int i, long n) {
    fprintf(out, "%s %d type=%ld len=%ld sum=%08x\n", tag, i, m.mtype, n,
            fnv((unsigned char *)m.mtext, (size_t)n));
}

static int dump(int q, int s, int h) {
    if (q >= 0) {
        struct msqid_ds d;
        if (msgctl(q, IPC_STAT, &d)) die("msgctl IPC_STAT");
        printf("MSG key=%d id=%d mode=%o uid=%u gid=%u qbytes=%lu qnum=%lu cbytes=%lu\n",
               d.msg_perm.__key, q, d.msg_perm.mode, d.msg_perm.uid, d.msg_perm.gid,
               (unsigned long)d.msg_qbytes, (unsigned long)d.msg_qnum,
               (unsigned long)d.__msg_cbytes);
        printf("MSGTIMES stime=%ld rtime=%ld lspid=%d lrpid=%d\n", (long)d.msg_stime,
               (long)d.msg_rtime, d.msg_lspid, d.msg_lrpid);
        for (unsigned long i = 0; i < d.msg_qnum; i++) {
            long n = msgrcv(q, &m, sizeof m.mtext, (long)i, MSG_COPY | IPC_NOWAIT);
            if (n < 0) die("msgrcv MSG_COPY");
            print_msg(stdout, "M", (int)i, n);
        }
    }
    if (s >= 0) {
        struct semid_ds d;
        if (semctl(s, 0, IPC_STAT, &d)) die("semctl IPC_STAT");
        printf("SEM key=%d id=%d mode=%o uid=%u gid=%u nsems=%lu\n", d.sem_perm.__key, s,
               d.sem_perm.mode, d.sem_perm.uid, d.sem_perm.gid, (unsigned long)d.sem_nsems);
        for (unsigned long i = 0; i < d.sem_nsems; i++)
            printf("S %lu val=%d\n", i, semctl(s, (int)i, GETVAL));
    }
    if (h >= 0) {
        struct shmid_ds d;
        if (shmctl(h, IPC_STAT, &d)) die("shmctl IPC_STAT");
        printf("SHM key=%d id=%d mode=%o uid=%u gid=%u size=%lu\n", d.shm_perm.__key, h,
               d.shm_perm.mode & 0777, d.shm_perm.uid, d.shm_perm.gid,
               (unsigned long)d.shm_segsz);
        unsigned char *p = shmat(h, 0, SHM_RDONLY);
        if (p == (void *)-1) die("shmat");
        for (size_t off = 0; off < d.shm_segsz; off += 4096) {
            size_t n = d.shm_segsz - off < 4096 ? d.shm_segsz - off : 4096;
            size_t k = 0;
            while (k < n && !p[off + k]) k++;
            if (k < n) printf("P %zu sum=%08x\n", off / 4096, fnv(p + off, n));
        }
        shmdt(p);
    }
    return 0;
}

static int drain(int q) {
    for (int i = 0;; i++) {
        long n = msgrcv(q, &m, sizeof m.mtext, 0, IPC_NOWAIT);
        if (n < 0) {
            if (errno == ENOMSG) return 0;
            die("msgrcv");
        }
        print_msg(stdout, "M", i, n);
    }
}

static volatile sig_atomic_t usr1;
static void on_usr1(int sig) {
    (void)sig;
    usr1++;
}

static int worker(int q, int s, const char *log) {
    int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd < 0) die("open log");
    FILE *out = fdopen(fd, "a");
    setvbuf(out, 0, _IONBF, 0);
    signal(SIGUSR1, on_usr1);
    fprintf(out, "READY\n");
    int got = 0;
    for (;;) {
        usleep(20000);
        while (usr1 > got) {
            got++;
            long n = msgrcv(q, &m, sizeof m.mtext, 0, IPC_NOWAIT);
            int e = errno;
            struct sembuf op = {3, -1, IPC_NOWAIT};
            int rc = semop(s, &op, 1);
            int v = semctl(s, 3, GETVAL);
            if (n < 0)
                fprintf(out, "GOT none errno=%d semop=%d sem3=%d\n", e, rc, v);
            else
                fprintf(out, "GOT type=%ld len=%ld sum=%08x semop=%d sem3=%d\n", m.mtype, n,
                        fnv((unsigned char *)m.mtext, (size_t)n), rc, v);
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "create")) return create((key_t)strtol(argv[2], 0, 0));
    if (argc == 5 && !strcmp(argv[1], "dump"))
        return dump(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]));
    if (argc == 3 && !strcmp(argv[1], "drain")) return drain(atoi(argv[2]));
    if (argc == 5 && !strcmp(argv[1], "worker"))
        return worker(atoi(argv[2]), atoi(argv[3]), argv[4]);
    fprintf(stderr, "usage: sysv_ipc create KEY | dump MSG SEM SHM | drain MSG | worker MSG SEM LOG\n");
    return 2;
}
