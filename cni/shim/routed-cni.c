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
 * Build: musl-gcc -static -Os -o routed-cni routed-cni.c
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define SUPPORTED "[\"0.4.0\",\"1.0.0\",\"1.1.0\"]"
#define LATEST "1.1.0"
#define DEFAULT_SOCKET "/var/run/routed/agent.sock"
#define DEFAULT_LOG "/var/log/routed/cni.log"
#define MAX_INPUT (4 << 20)

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
 * colons in place, nothing after it). Values are not validated further: the agent does that. */
typedef struct { char version[64], socket[108], log[4096]; int ok; } netconf;

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

static void copy_string(const char *value, char *out, size_t size) {
    const char *end = skip_string(value);
    if (end && (size_t)(end - value - 2) < size) { memcpy(out, value + 1, end - value - 2); out[end - value - 2] = 0; }
}

static netconf read_netconf(const char *js) {
    netconf nc = {"", DEFAULT_SOCKET, DEFAULT_LOG, 0};
    const char *p = skip_ws(js);
    if (*p++ != '{') return nc;
    if (*(p = skip_ws(p)) == '}') { nc.ok = !*skip_ws(p + 1); return nc; }
    for (;;) {
        const char *key = skip_ws(p), *end;
        if (*key != '"' || !(end = skip_string(key)) || *(p = skip_ws(end)) != ':') return nc;
        const char *value = skip_ws(p + 1);
        if (!(p = skip_value(value))) return nc;
        size_t klen = (size_t)(end - key - 2);
        if (*value == '"') {
            if (klen == 10 && !strncmp(key + 1, "cniVersion", 10)) copy_string(value, nc.version, sizeof nc.version);
            if (klen == 10 && !strncmp(key + 1, "socketPath", 10)) copy_string(value, nc.socket, sizeof nc.socket);
            if (klen == 7 && !strncmp(key + 1, "logFile", 7)) copy_string(value, nc.log, sizeof nc.log);
        }
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

static void fail(const char *version, int code, const char *msg, const char *details) {
    printf("{\"cniVersion\":\"%s\",\"code\":%d,\"msg\":\"%s\"", version, code, msg);
    if (details && *details) printf(",\"details\":\"%s\"", details);
    printf("}\n");
    exit(1);
}

static void log_unreachable(const char *path, const char *cmd, const char *sock, const char *why) {
    FILE *f = fopen(path, "a");
    if (!f) return; /* never fatal */
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    char stamp[32];
    strftime(stamp, sizeof stamp, "%Y-%m-%d %H:%M:%S", localtime(&ts.tv_sec));
    const char *c = getenv("CNI_CONTAINERID"), *i = getenv("CNI_IFNAME");
    fprintf(f, "%s,%03ld ERROR pid=%d cmd=%s container=%s ifname=%s routed agent unreachable at %s: %s\n", stamp,
            ts.tv_nsec / 1000000, (int)getpid(), cmd, c ? c : "-", i ? i : "-", sock, why);
    fclose(f);
}

int main(void) {
    buf in = {0}, req = {0}, env = {0}, resp = {0};
    char chunk[65536], version[32] = LATEST;
    ssize_t n;
    put(&in, "", 0);
    while ((n = read(0, chunk, sizeof chunk)) > 0 && in.len < MAX_INPUT) put(&in, chunk, (size_t)n);
    const char *cmd = getenv("CNI_COMMAND");
    netconf nc = read_netconf(in.data);
    if (!strcmp(nc.version, "0.4.0") || !strcmp(nc.version, "1.0.0") || !strcmp(nc.version, "1.1.0"))
        strcpy(version, nc.version); /* errors speak the requested version when we support it */
    if (cmd && !strcmp(cmd, "VERSION")) {
        printf("{\"cniVersion\":\"%s\",\"supportedVersions\":" SUPPORTED "}\n", *nc.version ? nc.version : LATEST);
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
    if (!nc.ok) /* without a readable netconf there is no socket path to forward to */
        fail(version, 6, "failed to decode the network configuration on stdin", "not one well-formed JSON object");
    char missing[256] = "", names[256];
    strcpy(names, needs[verb]);
    for (char *v = strtok(names, " "); v; v = strtok(NULL, " "))
        if (!getenv(v) || !*getenv(v)) { strcat(missing, *missing ? ", " : ""); strcat(missing, v); }
    if (*missing) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s not set", missing);
        fail(version, 4, msg, "invalid environment");
    }
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
        snprintf(msg, sizeof msg, "the routed agent is not reachable at %s; try again later", sock);
        fail(version, verb == 4 ? 50 : 11, msg, why);
    }
    out += 10;
    fwrite(out, 1, unb64(out, strlen(out)), stdout);
    return atoi(code + 11);
}
