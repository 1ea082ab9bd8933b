/* counter: a C actor agent (WASI reactor, -mexec-model=reactor).
 *
 * ABI (docs/AGENTS.md): the host calls _initialize once, then for every
 * message alloc(from_len + msg_len) and handle(from_ptr, from_len, msg_ptr,
 * msg_len); the agent answers through the "chimera" host functions.
 *
 * Messages (ASCII text):
 *   "inc"                 count += 1
 *   "get"                 reply "count <n>" (VERSION 2: "count v2 <n>") to the sender
 *   "ping <k> <limit>"    count += 1; reply "ping <k+1> <limit>" to the sender,
 *                         or "done <k>" once k >= limit
 *   "done <k>"            count += 1; log "done <k>"
 *   "fwd <target> <text>" send <text> to <target>; reply "fwd-status <rc>"
 *   "echo <text>"         reply <text> to the sender
 *   "trap"                executes an unreachable instruction (the host discards the instance)
 * anything else           handler error (returns 1)
 *
 * Build flags: -DVERSION=2 makes the upgrade build; -DBROKEN makes a bad
 * version that traps on every "inc" and "echo" (used by the rollback test).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef VERSION
#define VERSION 1
#endif

__attribute__((import_module("chimera"), import_name("send")))
int32_t chimera_send(const char *to, int32_t to_len, const char *msg, int32_t msg_len);
__attribute__((import_module("chimera"), import_name("log")))
void chimera_log(const char *text, int32_t len);
__attribute__((import_module("chimera"), import_name("now_ms")))
int64_t chimera_now_ms(void);

static char *inbox;
static int32_t inbox_cap;
static uint64_t count;

/* Buffer for the host to copy one message into; valid until the next alloc. */
__attribute__((export_name("alloc")))
char *alloc(int32_t size) {
    if (size < 0) return 0;
    if (size > inbox_cap) {
        char *fresh = realloc(inbox, (size_t)size);
        if (!fresh) return 0;
        inbox = fresh;
        inbox_cap = size;
    }
    return inbox ? inbox : (char *)&inbox_cap; /* size 0: any valid address */
}

static int starts_with(const char *msg, int32_t len, const char *prefix) {
    size_t n = strlen(prefix);
    return (size_t)len >= n && memcmp(msg, prefix, n) == 0;
}

static void reply(const char *from, int32_t from_len, const char *text, int32_t len) {
    chimera_send(from, from_len, text, len);
}

__attribute__((export_name("handle")))
int32_t handle(const char *from, int32_t from_len, const char *msg, int32_t msg_len) {
    char out[160];
    char text[96];
    int n;
    if (msg_len == 3 && memcmp(msg, "inc", 3) == 0) {
#ifdef BROKEN
        __builtin_trap();
#endif
        count++;
        return 0;
    }
    if (msg_len == 3 && memcmp(msg, "get", 3) == 0) {
        n = snprintf(out, sizeof out, VERSION == 2 ? "count v2 %llu" : "count %llu",
                     (unsigned long long)count);
        reply(from, from_len, out, n);
        return 0;
    }
    if (msg_len == 4 && memcmp(msg, "trap", 4) == 0) {
        __builtin_trap();
    }
    if (starts_with(msg, msg_len, "ping ") && msg_len < (int32_t)sizeof text) {
        unsigned long k, limit;
        memcpy(text, msg, (size_t)msg_len);
        text[msg_len] = '\0';
        if (sscanf(text, "ping %lu %lu", &k, &limit) != 2) return 1;
        count++;
        if (k >= limit) n = snprintf(out, sizeof out, "done %lu", k);
        else n = snprintf(out, sizeof out, "ping %lu %lu", k + 1, limit);
        reply(from, from_len, out, n);
        return 0;
    }
    if (starts_with(msg, msg_len, "done ")) {
        count++;
        chimera_log(msg, msg_len);
        return 0;
    }
    if (starts_with(msg, msg_len, "fwd ")) {
        const char *target = msg + 4;
        const char *end = memchr(target, ' ', (size_t)(msg_len - 4));
        if (!end) return 1;
        int32_t rc = chimera_send(target, (int32_t)(end - target), end + 1,
                                  (int32_t)(msg + msg_len - end - 1));
        n = snprintf(out, sizeof out, "fwd-status %d", (int)rc);
        reply(from, from_len, out, n);
        return 0;
    }
    if (starts_with(msg, msg_len, "echo ")) {
#ifdef BROKEN
        __builtin_trap();
#endif
        reply(from, from_len, msg + 5, msg_len - 5);
        return 0;
    }
    if (msg_len == 4 && memcmp(msg, "time", 4) == 0) {
        n = snprintf(out, sizeof out, "time %lld", (long long)chimera_now_ms());
        reply(from, from_len, out, n);
        return 0;
    }
    return 1;
}
