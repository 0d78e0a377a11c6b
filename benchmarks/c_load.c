/* A load generator in C, so that the client costs the shared machine as little as it
 * can. Not a product: anything that goes wrong is counted as an error, and that
 * connection starts again. CONNS connections run at once on one epoll loop.
 *
 *   bare: the seeds' bare session. Connect, read "Welcome!", send "c1", read
 *         "Hello, c1!", send "exit", read the server's close, close; then the next
 *         session. An operation is a session.
 *   greet: the seeds' bare words on a connection held open. Connect, read "Welcome!",
 *         then send "c1" and read "Hello, c1!", again and again. An operation is a
 *         round trip.
 *   echo: SIZE bytes sent on a connection held open, read back whole and compared, then
 *         sent again. An operation is a round trip. (A server that greets is wrong.)
 *
 *   cc -O2 -o c_load benchmarks/c_load.c
 *   ./c_load bare PORT CONNS SECONDS WARMUP_SECONDS
 *   ./c_load greet PORT CONNS SECONDS WARMUP_SECONDS
 *   ./c_load echo PORT CONNS SECONDS WARMUP_SECONDS SIZE
 * Prints "OPERATIONS ERRORS SECONDS": the operations completed in the SECONDS after the
 * warm-up. benchmarks/cpu_split.py runs it against netframe and the raw server. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum state { CONNECTING, WELCOME, HELLO, CLOSING, ECHOING };

struct conn {
    int fd;
    enum state state;
    size_t got;
    char *buf; /* what has come back so far */
};

static int ep;
static int echo;      /* the work: echo */
static int greet;     /* the work: greet (bare words on a held connection) */
static size_t size;   /* echo: bytes a message */
static char *payload; /* echo: the message */
static struct sockaddr_in server;
static long done, errors;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void begin(struct conn *c) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    /* Non-blocking: EINPROGRESS. Bare: the greeting's arrival says it connected. Echo:
     * writable says so, and the first message goes then. */
    connect(c->fd, (struct sockaddr *)&server, sizeof server);
    c->state = echo ? CONNECTING : WELCOME;
    c->got = 0;
    struct epoll_event ev = {.events = echo ? EPOLLOUT : EPOLLIN, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
}

static void again(struct conn *c, int ok) {
    if (ok)
        done++;
    else
        errors++;
    close(c->fd);
    begin(c);
}

/* The whole of `data`, or an error: it is small next to the socket's buffer, and the
 * server has read everything sent before it. */
static int send_all(struct conn *c, const char *data, size_t length) {
    if (write(c->fd, data, length) == (ssize_t)length)
        return 1;
    again(c, 0);
    return 0;
}

/* Bare and greet: wait for `want` bytes equal to `text`; then send `next` and move to
 * `state`. 1 when that was done; 0 while bytes are missing, or after an error. */
static int step(struct conn *c, const char *text, size_t want, const char *next,
                enum state state) {
    if (c->got < want)
        return 0;
    if (c->got != want || memcmp(c->buf, text, want) != 0) {
        again(c, 0);
        return 0;
    }
    c->got = 0;
    c->state = state;
    return send_all(c, next, strlen(next));
}

static void readable(struct conn *c, unsigned events) {
    if (c->state == CONNECTING) {
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (events & (EPOLLERR | EPOLLHUP)) {
            again(c, 0);
            return;
        }
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
        c->state = ECHOING;
        send_all(c, payload, size);
        return;
    }
    size_t room = echo ? size : 64;
    ssize_t r = read(c->fd, c->buf + c->got, room - c->got);
    if (r < 0 && errno == EAGAIN)
        return;
    if (c->state == CLOSING) { /* only the server's close may come now */
        again(c, r == 0);
        return;
    }
    if (r <= 0) {
        again(c, 0);
        return;
    }
    c->got += (size_t)r;
    if (c->state == WELCOME) {
        step(c, "Welcome!", 8, "c1", HELLO);
    } else if (c->state == HELLO && greet) {
        done += step(c, "Hello, c1!", 10, "c1", HELLO); /* a round trip, the next sent */
    } else if (c->state == HELLO) {
        step(c, "Hello, c1!", 10, "exit", CLOSING);
    } else if (c->got == size) { /* ECHOING: a whole message back */
        if (memcmp(c->buf, payload, size) != 0) {
            again(c, 0);
            return;
        }
        done++;
        c->got = 0;
        send_all(c, payload, size);
    }
}

int main(int argc, char **argv) {
    echo = argc == 7 && strcmp(argv[1], "echo") == 0;
    greet = argc == 6 && strcmp(argv[1], "greet") == 0;
    if (!(echo || greet || (argc == 6 && strcmp(argv[1], "bare") == 0))) {
        fprintf(stderr, "usage: c_load bare PORT CONNS SECONDS WARMUP_SECONDS\n"
                        "       c_load greet PORT CONNS SECONDS WARMUP_SECONDS\n"
                        "       c_load echo PORT CONNS SECONDS WARMUP_SECONDS SIZE\n");
        return 2;
    }
    int conns = atoi(argv[3]);
    double seconds = atof(argv[4]), warmup = atof(argv[5]);
    size = echo ? (size_t)atol(argv[6]) : 64;
    if (conns < 1 || size < 1) {
        fprintf(stderr, "c_load: CONNS and SIZE must be at least 1\n");
        return 2;
    }
    payload = malloc(size);
    for (size_t i = 0; i < size; i++)
        payload[i] = (char)('a' + i % 26);
    server.sin_family = AF_INET;
    server.sin_port = htons((unsigned short)atoi(argv[2]));
    server.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ep = epoll_create1(0);
    struct conn *all = calloc((size_t)conns, sizeof *all);
    for (int i = 0; i < conns; i++) {
        all[i].buf = malloc(size);
        begin(&all[i]);
    }
    struct epoll_event events[256];
    double start = now() + warmup, end = start + seconds;
    long before = -1;
    for (;;) {
        double t = now();
        if (before < 0 && t >= start)
            before = done;
        if (t >= end)
            break;
        int n = epoll_wait(ep, events, 256, 100);
        for (int i = 0; i < n; i++)
            readable(events[i].data.ptr, events[i].events);
    }
    printf("%ld %ld %.3f\n", done - before, errors, seconds);
    return 0;
}
