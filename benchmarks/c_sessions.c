/* A load generator in C for the seeds' bare session, so that the client costs the
 * shared machine as little as it can: connect, read "Welcome!", send "c1", read
 * "Hello, c1!", send "exit", read the server's close, close; then the next session.
 * CONNS sessions run at once on one epoll loop. Not a product: a session that goes
 * wrong in any way is counted as an error and started again.
 *
 *   cc -O2 -o c_sessions benchmarks/c_sessions.c
 *   ./c_sessions PORT CONNS SECONDS WARMUP_SECONDS
 * Prints "SESSIONS ERRORS SECONDS": the sessions completed in the SECONDS after the
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

enum state { WELCOME, HELLO, CLOSING };

struct session {
    int fd;
    enum state state;
    size_t got;
    char buf[64];
};

static int ep;
static struct sockaddr_in server;
static long done, errors;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void begin(struct session *s) {
    s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    /* Non-blocking: EINPROGRESS, and the greeting's arrival says it connected. */
    connect(s->fd, (struct sockaddr *)&server, sizeof server);
    s->state = WELCOME;
    s->got = 0;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = s};
    epoll_ctl(ep, EPOLL_CTL_ADD, s->fd, &ev);
}

static void again(struct session *s, int ok) {
    if (ok)
        done++;
    else
        errors++;
    close(s->fd);
    begin(s);
}

/* Wait for `want` bytes equal to `text`; then send `next` and move to `state`. */
static void step(struct session *s, const char *text, size_t want, const char *next,
                 enum state state) {
    if (s->got < want)
        return;
    if (s->got != want || memcmp(s->buf, text, want) != 0) {
        again(s, 0);
        return;
    }
    s->got = 0;
    s->state = state;
    if (write(s->fd, next, strlen(next)) != (ssize_t)strlen(next))
        again(s, 0);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: c_sessions PORT CONNS SECONDS WARMUP_SECONDS\n");
        return 2;
    }
    int conns = atoi(argv[2]);
    double seconds = atof(argv[3]), warmup = atof(argv[4]);
    server.sin_family = AF_INET;
    server.sin_port = htons((unsigned short)atoi(argv[1]));
    server.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ep = epoll_create1(0);
    struct session *sessions = calloc((size_t)conns, sizeof *sessions);
    for (int i = 0; i < conns; i++)
        begin(&sessions[i]);
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
        for (int i = 0; i < n; i++) {
            struct session *s = events[i].data.ptr;
            ssize_t r = read(s->fd, s->buf + s->got, sizeof s->buf - s->got);
            if (r < 0 && errno == EAGAIN)
                continue;
            if (s->state == CLOSING) { /* only the server's close may come now */
                again(s, r == 0);
                continue;
            }
            if (r <= 0) {
                again(s, 0);
                continue;
            }
            s->got += (size_t)r;
            if (s->state == WELCOME)
                step(s, "Welcome!", 8, "c1", HELLO);
            else
                step(s, "Hello, c1!", 10, "exit", CLOSING);
        }
    }
    printf("%ld %ld %.3f\n", done - before, errors, seconds);
    return 0;
}
