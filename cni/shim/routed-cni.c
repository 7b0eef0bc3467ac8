/*
 * routed-cni: the CNI executable a container runtime runs. A static binary with no runtime dependency.
 *
 * It answers VERSION itself, checks that the CNI environment names what the command needs (code 4), and
 * forwards the CNI_* environment and stdin, untouched, to the node agent's unix socket as one local API
 * request:  {"method":"cni","params":{"env":"<base64 of NUL-separated K=V>","stdin":"<base64>"}}
 * The agent answers {"result":{"exitCode":N,"stdout":"<base64>"}}; the shim prints those bytes and exits N.
 * Everything else (parsing, validation, version conversion, error codes, logging) is the agent's.
 * Agent unreachable: code 11 (STATUS: 50) naming the socket, plus one line appended to the netconf's logFile.
 *
 * It also refuses, itself, a cniVersion the agent does not speak (code 1), so that answer never depends on the
 * agent being up: VERSION advertises SUPPORTED, and a call under another version must not get "try again".
 * SUPPORTED and VERBS_1_1 mirror cni/request.py (SUPPORTED_VERSIONS, VERBS_1_1); tests/unit/test_cni_shim.py
 * holds them equal and compares these answers with the agent's own for the same input.
 *
 * Hostile input: stdin is read up to MAX_INPUT (more is code 6); the netconf scan is iterative, bounded by the
 * input and never reads past its NUL; values are copied only when they fit. A netconf that is not one
 * well-formed JSON object is code 6 here; a well-formed one whose cniVersion is not a plain string (absent, not
 * a string, or with JSON escapes) goes to the agent, which decides (codes 1, 6, 7).
 *
 * The log file is opened as root on the host, so it never follows a symlink, never blocks (a FIFO), and is used
 * only when it is a regular file owned by root with one link (created 0600); otherwise the line goes to stderr.
 *
 * Build: musl-gcc -static -Os -o routed-cni routed-cni.c
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* == cni/request.py SUPPORTED_VERSIONS and LATEST_VERSION; GC and STATUS need 1.1.0 (cni/request.py VERBS_1_1) */
static const char *const SUPPORTED[] = {"0.4.0", "1.0.0", "1.1.0"};
#define N_SUPPORTED (sizeof SUPPORTED / sizeof *SUPPORTED)
#define SUPPORTED_TEXT "0.4.0, 1.0.0, 1.1.0" /* the agent's "supported: ..." details */
#define LATEST "1.1.0"
#define VERSION_1_1 "1.1.0"
#define DEFAULT_SOCKET "/var/run/routed/agent.sock"
#define DEFAULT_LOG "/var/log/routed/cni.log"
#define MAX_INPUT (2 << 20) /* base64 of it stays under the agent's 4 MiB request line */

extern char **environ;

typedef struct { char *data; size_t len, cap; } buf;

static void put(buf *b, const char *s, size_t n) {
    if (b->len + n + 1 > b->cap) {
        b->cap = (b->len + n + 1) * 2;
        if (!(b->data = realloc(b->data, b->cap))) exit(99);
    }
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = 0;
}

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static void put_b64(buf *b, const unsigned char *s, size_t n) {
    for (size_t i = 0; i < n; i += 3) {
        unsigned v = s[i] << 16 | (i + 1 < n ? s[i + 1] << 8 : 0) | (i + 2 < n ? s[i + 2] : 0);
        char q[4] = {B64[v >> 18 & 63], B64[v >> 12 & 63], i + 1 < n ? B64[v >> 6 & 63] : '=',
                     i + 2 < n ? B64[v & 63] : '='};
        put(b, q, 4);
    }
}

static size_t unb64(char *s, size_t n) { /* in place; stops at the first non-base64 character */
    size_t out = 0, bits = 0;
    unsigned v = 0;
    for (size_t i = 0; i < n; i++) {
        const char *p = s[i] ? strchr(B64, s[i]) : NULL;
        if (!p) break;
        v = v << 6 | (unsigned)(p - B64);
        if ((bits += 6) >= 8) s[out++] = (char)(v >> (bits -= 8));
    }
    return out;
}

/* The netconf on stdin, read once: the string values (still JSON-escaped) of the three top-level keys the shim
 * itself needs, and whether the text is one well-formed JSON object (brackets balanced, strings closed, keys and
 * colons in place, nothing after it). A key given twice counts by its last value, as for the agent's json.loads.
 * Values are not validated further: the agent does that, except cniVersion (see version_refused). */
enum { V_NONE, V_PLAIN, V_ESCAPED, V_LONG }; /* cniVersion: absent or not a string; a plain string; with escapes;
                                               * a plain string too long to be any version we speak */
typedef struct { char version[32], socket[108], log[4096]; int version_kind, ok; } netconf;

static const char *skip_ws(const char *p) { while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') p++; return p; }

static const char *skip_string(const char *p) { /* p at the opening quote; past the closing one, or NULL */
    for (p++; *p && *p != '"'; p++)
        if (*p == '\\' && !*++p) return NULL;
    return *p ? p + 1 : NULL;
}

static const char *skip_value(const char *p) { /* one value of any kind; NULL when it is not well-formed */
    int depth = 0;
    do {
        p = skip_ws(p);
        if (*p == '"') { if (!(p = skip_string(p))) return NULL; }
        else if (*p == '{' || *p == '[') { depth++; p++; }
        else if (*p == '}' || *p == ']') { if (--depth < 0) return NULL; p++; }
        else if (*p == ',' || *p == ':') { if (!depth) return NULL; p++; }
        else if (!*p) return NULL;
        else { do p++; while (*p && !strchr(" \t\r\n,:]}[{\"", *p)); }
    } while (depth > 0);
    return p;
}

static int copy_string(const char *value, char *out, size_t size) { /* 1 if it fit, else out is left "" */
    const char *end = skip_string(value);
    size_t n = end ? (size_t)(end - value - 2) : size;
    out[0] = 0;
    if (n >= size) return 0;
    memcpy(out, value + 1, n);
    out[n] = 0;
    return 1;
}

static int key_is(const char *key, size_t klen, const char *name) { return klen == strlen(name) && !strncmp(key + 1, name, klen); }

static netconf read_netconf(const char *js) {
    netconf nc = {"", DEFAULT_SOCKET, DEFAULT_LOG, V_NONE, 0};
    const char *p = skip_ws(js);
    if (*p++ != '{') return nc;
    if (*(p = skip_ws(p)) == '}') { nc.ok = !*skip_ws(p + 1); return nc; }
    for (;;) {
        const char *key = skip_ws(p), *end;
        if (*key != '"' || !(end = skip_string(key)) || *(p = skip_ws(end)) != ':') return nc;
        const char *value = skip_ws(p + 1);
        if (!(p = skip_value(value))) return nc;
        size_t klen = (size_t)(end - key - 2);
        int is_string = *value == '"';
        if (key_is(key, klen, "cniVersion")) {
            nc.version_kind = !is_string ? V_NONE : !copy_string(value, nc.version, sizeof nc.version) ? V_LONG
                              : strchr(nc.version, '\\') ? V_ESCAPED : V_PLAIN;
            if (nc.version_kind == V_LONG && memchr(value + 1, '\\', (size_t)(p - value - 1))) nc.version_kind = V_ESCAPED;
            if (nc.version_kind != V_PLAIN) nc.version[0] = 0;
        }
        if (key_is(key, klen, "socketPath") && (!is_string || !copy_string(value, nc.socket, sizeof nc.socket)))
            strcpy(nc.socket, DEFAULT_SOCKET);
        if (key_is(key, klen, "logFile") && (!is_string || !copy_string(value, nc.log, sizeof nc.log)))
            strcpy(nc.log, DEFAULT_LOG);
        p = skip_ws(p);
        if (*p == ',') { p++; continue; }
        nc.ok = *p == '}' && !*skip_ws(p + 1);
        return nc;
    }
}

static void unescape(char *s) { /* the JSON escapes a path can carry: \" \\ \/ */
    char *o = s;
    for (; *s; s++) *o++ = (*s == '\\' && s[1]) ? *++s : *s;
    *o = 0;
}

static int printable(const char *s) { /* safe to print inside a JSON string and a log line as it is */
    for (; *s; s++)
        if (*s < 0x20 || *s > 0x7e || *s == '"' || *s == '\\') return 0;
    return 1;
}

static int supported(const char *version) {
    for (size_t i = 0; i < N_SUPPORTED; i++)
        if (!strcmp(version, SUPPORTED[i])) return 1;
    return 0;
}

static void fail(const char *version, int code, const char *msg, const char *details) {
    printf("{\"cniVersion\":\"%s\",\"code\":%d,\"msg\":\"%s\"", version, code, msg);
    if (details && *details) printf(",\"details\":\"%s\"", details);
    printf("}\n");
    exit(1);
}

/* Code 1 for a cniVersion the agent would refuse, worded as cni/request.py validate_netconf words it. Only a
 * plain string is judged here: one with escapes is the agent's to decode. */
static void refuse_version(const netconf *nc, int verb_needs_1_1, const char *cmd) {
    char msg[128];
    if (nc->version_kind == V_LONG) fail(LATEST, 1, "cniVersion is not supported", "supported: " SUPPORTED_TEXT);
    if (nc->version_kind != V_PLAIN || !*nc->version) return; /* absent, not a string, escaped, or "": the agent's */
    if (!supported(nc->version)) {
        if (printable(nc->version)) snprintf(msg, sizeof msg, "cniVersion '%s' is not supported", nc->version);
        else snprintf(msg, sizeof msg, "cniVersion is not supported");
        fail(LATEST, 1, msg, "supported: " SUPPORTED_TEXT);
    }
    if (verb_needs_1_1 && strcmp(nc->version, VERSION_1_1)) {
        snprintf(msg, sizeof msg, "%s needs cniVersion " VERSION_1_1 ", the configuration says %s", cmd, nc->version);
        fail(nc->version, 1, msg, NULL);
    }
}

/* The log file, opened as host root from a path in the netconf, inside a directory the agent's container can
 * write: never through a symlink (O_NOFOLLOW), never blocking on a FIFO (O_NONBLOCK), never a device, a
 * hard link (the target of a link made in the container) or a file someone else owns. -1 with `why` if refused. */
static int open_log(const char *path, char *why, size_t size) {
    struct stat before, st;
    if (path[0] != '/') { snprintf(why, size, "not an absolute path"); return -1; }
    int existed = lstat(path, &before) == 0;
    if (existed && !S_ISREG(before.st_mode)) { snprintf(why, size, "not a regular file"); return -1; }
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK | O_NOCTTY, 0600);
    if (fd < 0) { snprintf(why, size, "%s", errno == ELOOP ? "a symbolic link" : strerror(errno)); return -1; }
    const char *bad = fstat(fd, &st) ? strerror(errno)
                      : !S_ISREG(st.st_mode) ? "not a regular file"
                      : st.st_uid != 0 ? "not owned by root"
                      : st.st_nlink != 1 ? "has more than one link"
                      : existed && (st.st_dev != before.st_dev || st.st_ino != before.st_ino) ? "replaced while opened"
                      : NULL;
    if (bad) { snprintf(why, size, "%s", bad); close(fd); return -1; }
    return fd;
}

static void sanitize(char *s) { for (; *s; s++) if ((unsigned char)*s < 0x20 || *s == 0x7f) *s = '?'; }

static void log_unreachable(const char *path, const char *cmd, const char *sock, const char *why) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    char stamp[32], line[1024], refused[128];
    strftime(stamp, sizeof stamp, "%Y-%m-%d %H:%M:%S", localtime(&ts.tv_sec));
    const char *c = getenv("CNI_CONTAINERID"), *i = getenv("CNI_IFNAME");
    int n = snprintf(line, sizeof line, "%s,%03ld ERROR pid=%d cmd=%s container=%.128s ifname=%.32s routed agent "
                     "unreachable at %s: %s", stamp, ts.tv_nsec / 1000000, (int)getpid(), cmd, c ? c : "-",
                     i ? i : "-", sock, why);
    if (n < 0) return;
    sanitize(line); /* one line, whatever the environment and the netconf hold */
    size_t len = strlen(line);
    line[len++] = '\n';
    int fd = open_log(path, refused, sizeof refused);
    if (fd >= 0) {
        ssize_t written = write(fd, line, len); /* never fatal */
        (void)written;
        close(fd);
        return;
    }
    char safe_path[256];
    snprintf(safe_path, sizeof safe_path, "%.255s", path);
    sanitize(safe_path);
    fprintf(stderr, "routed-cni: not logging to %s (%s): %.*s", safe_path, refused, (int)len, line);
}

int main(void) {
    buf in = {0}, req = {0}, env = {0}, resp = {0};
    char chunk[65536], version[32] = LATEST;
    ssize_t n;
    put(&in, "", 0);
    while (in.len <= MAX_INPUT && (n = read(0, chunk, sizeof chunk)) > 0) put(&in, chunk, (size_t)n);
    const char *cmd = getenv("CNI_COMMAND");
    netconf nc = read_netconf(in.data);
    if (memchr(in.data, 0, in.len)) nc.ok = 0; /* a NUL byte ends the scan early: never one JSON text */
    if (nc.version_kind == V_PLAIN && supported(nc.version))
        strcpy(version, nc.version); /* errors speak the requested version when we support it */
    if (cmd && !strcmp(cmd, "VERSION")) {
        printf("{\"cniVersion\":\"%s\",\"supportedVersions\":[", *nc.version && printable(nc.version) ? nc.version : LATEST);
        for (size_t i = 0; i < N_SUPPORTED; i++) printf("%s\"%s\"", i ? "," : "", SUPPORTED[i]);
        printf("]}\n");
        return 0;
    }
    static const char *verbs[] = {"ADD", "DEL", "CHECK", "GC", "STATUS"}, *needs[] = {
        "CNI_CONTAINERID CNI_NETNS CNI_IFNAME", "CNI_CONTAINERID CNI_IFNAME", "CNI_CONTAINERID CNI_NETNS CNI_IFNAME",
        "", ""};
    int verb = -1;
    for (int i = 0; cmd && i < 5; i++)
        if (!strcmp(cmd, verbs[i])) verb = i;
    if (verb < 0)
        fail(version, 4, cmd ? "CNI_COMMAND is not one of ADD, DEL, CHECK, VERSION, GC, STATUS"
                             : "CNI_COMMAND is not set", "invalid environment: CNI_COMMAND");
    if (in.len > MAX_INPUT)
        fail(LATEST, 6, "failed to decode the network configuration on stdin", "larger than 2 MiB");
    if (!nc.ok) /* without a readable netconf there is no socket path to forward to */
        fail(LATEST, 6, "failed to decode the network configuration on stdin", "not one well-formed JSON object");
    char missing[256] = "", names[256];
    strcpy(names, needs[verb]);
    for (char *v = strtok(names, " "); v; v = strtok(NULL, " "))
        if (!getenv(v) || !*getenv(v)) { strcat(missing, *missing ? ", " : ""); strcat(missing, v); }
    if (*missing) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s not set", missing);
        fail(version, 4, msg, "invalid environment");
    }
    refuse_version(&nc, verb >= 3, cmd); /* the agent's order: decode (6), environment (4), then version (1) */
    for (char **e = environ; *e; e++)
        if (!strncmp(*e, "CNI_", 4)) put(&env, *e, strlen(*e) + 1);
    put(&req, "{\"method\":\"cni\",\"params\":{\"env\":\"", 33);
    put_b64(&req, (unsigned char *)env.data, env.len);
    put(&req, "\",\"stdin\":\"", 11);
    put_b64(&req, (unsigned char *)in.data, in.len);
    put(&req, "\"}}\n", 4);

    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    char *sock = nc.socket, *logf = nc.log;
    strncpy(addr.sun_path, sock, sizeof addr.sun_path - 1);
    unescape(addr.sun_path);
    unescape(logf);
    struct timeval connect_limit = {5, 0}, answer = {120, 0}; /* an ADD waits for IPAM, wiring and policy */
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &connect_limit, sizeof connect_limit);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &answer, sizeof answer);
    int sent = fd >= 0 && connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0;
    for (size_t off = 0; sent && off < req.len; off += (size_t)n)
        if ((n = write(fd, req.data + off, req.len - off)) <= 0) sent = 0;
    while (sent && (n = read(fd, chunk, sizeof chunk)) > 0) put(&resp, chunk, (size_t)n);
    char *code = resp.data ? strstr(resp.data, "\"exitCode\":") : NULL, *out = resp.data ? strstr(resp.data, "\"stdout\":\"") : NULL;
    if (!sent || !code || !out) {
        char msg[256], why[128];
        snprintf(why, sizeof why, "%s", !sent ? strerror(errno) : resp.len ? "unexpected answer" : "no answer");
        log_unreachable(logf, cmd, sock, why);
        if (!printable(sock)) sock = "the configured socketPath";
        snprintf(msg, sizeof msg, "the routed agent is not reachable at %s; try again later", sock);
        fail(version, verb == 4 ? 50 : 11, msg, why);
    }
    out += 10;
    fwrite(out, 1, unb64(out, strlen(out)), stdout);
    return atoi(code + 11);
}
