/*
 * hookbench: the per-syscall cost floor for `cargo xtask bench`.
 *
 * Usage: hookbench PORT
 *   Connects to 127.0.0.1:PORT (a peer that drains everything), opens /dev/null, prints
 *   "ready PID" and then executes commands read from stdin, one per line, so that the same
 *   process can be measured with and without an agent attached to it:
 *     tcp N        N write()s of 64 B to the TCP socket      -> "ns_per_op TOTAL_NS"
 *     null N       N write()s of 64 B to /dev/null           -> "ns_per_op TOTAL_NS"
 *     tcprate N R  N write()s of 64 B to the socket, paced at R per second (R = 0: as fast as
 *                  possible)                                   -> "achieved_per_s TOTAL_NS"
 *     quit
 * Every loop is bounded by N; no traffic leaves 127.0.0.1.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int loop_writes(int fd, const char *buf, long n, double rate, uint64_t *total) {
    uint64_t t0 = now_ns();
    const long batch = 64;
    for (long i = 0; i < n; i++) {
        if (write(fd, buf, 64) != 64) {
            perror("write");
            return -1;
        }
        if (rate > 0 && (i % batch) == batch - 1) {
            /* Pace in small batches: sleep until batch i is due. */
            uint64_t due = t0 + (uint64_t)((double)(i + 1) * 1e9 / rate);
            uint64_t t = now_ns();
            if (due > t) {
                struct timespec ts = {(time_t)((due - t) / 1000000000ull),
                                      (long)((due - t) % 1000000000ull)};
                nanosleep(&ts, NULL);
            }
        }
    }
    *total = now_ns() - t0;
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: hookbench PORT\n");
        return 2;
    }
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)atoi(argv[1]));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof a) != 0) {
        perror("connect");
        return 1;
    }
    int one = 1;
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int dn = open("/dev/null", O_WRONLY);
    if (dn < 0) {
        perror("/dev/null");
        return 1;
    }
    char buf[64];
    memset(buf, 'x', sizeof buf);
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready %d\n", (int)getpid());
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        char cmd[32];
        long n = 0;
        double rate = 0;
        int k = sscanf(line, "%31s %ld %lf", cmd, &n, &rate);
        if (k < 1 || strcmp(cmd, "quit") == 0)
            break;
        if (n <= 0 || n > 100000000L) {
            printf("error bad N\n");
            continue;
        }
        uint64_t total = 0;
        int fd = strcmp(cmd, "null") == 0 ? dn : s;
        if (strcmp(cmd, "tcprate") != 0)
            rate = 0;
        if (loop_writes(fd, buf, n, rate, &total) != 0)
            return 1;
        if (strcmp(cmd, "tcprate") == 0)
            printf("%.1f %llu\n", (double)n * 1e9 / (double)total, (unsigned long long)total);
        else
            printf("%.1f %llu\n", (double)total / (double)n, (unsigned long long)total);
    }
    close(s);
    return 0;
}
