/* SPDX-License-Identifier: Apache-2.0 */
/* pycilium-cni launcher: forwards one CNI invocation (the CNI_* environment and stdin, untouched)
 * to the agent's socket, which runs the plugin's own logic (pycilium.cni.main.Invocation) and
 * answers with the exit code (X-CNI-Exit header) and the text for stdout (the body).
 *
 * It exists because a CNI plugin's start-up is pod start-up latency: this starts in about a
 * millisecond where the Python plugin needs ~15 ms. Whenever the fast path cannot be used
 * (VERSION, the agent unreachable, an agent without the endpoint, anything unexpected) it execs
 * the Python plugin (FALLBACK) with the same environment and stdin, which queues DELs, reports
 * "try again later" and so on exactly as specified. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

/* The Python plugin to fall back to: FALLBACK if compiled in, else pycilium-cni-py next to this
 * executable (so one binary works in any CNI bin dir). */
static const char *fallback_path(void)
{
#ifdef FALLBACK
	return FALLBACK;
#else
	static char path[4096];
	ssize_t n = readlink("/proc/self/exe", path, sizeof(path) - 32);
	if (n <= 0)
		return "/opt/cni/bin/pycilium-cni-py";
	path[n] = 0;
	char *slash = strrchr(path, '/');
	strcpy(slash ? slash + 1 : path, "pycilium-cni-py");
	return path;
#endif
}
#define DEFAULT_SOCKET "/var/run/pycilium/cni.sock"
#define MAX_IN (4 << 20)

extern char **environ;

struct buf {
	char *p;
	size_t n, cap;
};

static void put(struct buf *b, const char *s, size_t n)
{
	if (b->n + n + 1 > b->cap) {
		size_t cap = (b->cap ? b->cap * 2 : 8192);
		while (cap < b->n + n + 1)
			cap *= 2;
		char *np = realloc(b->p, cap);
		if (!np)
			exit(70);
		b->p = np;
		b->cap = cap;
	}
	memcpy(b->p + b->n, s, n);
	b->n += n;
	b->p[b->n] = 0;
}

static void puts_(struct buf *b, const char *s) { put(b, s, strlen(s)); }

static void put_json_string(struct buf *b, const char *s, size_t n)
{
	static const char hex[] = "0123456789abcdef";
	put(b, "\"", 1);
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c == '"' || c == '\\') {
			char e[2] = {'\\', (char)c};
			put(b, e, 2);
		} else if (c < 0x20) {
			char e[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
			put(b, e, 6);
		} else {
			put(b, (const char *)&c, 1);
		}
	}
	put(b, "\"", 1);
}

/* Exec the Python plugin with the same environment and the stdin we already consumed. */
static void fallback(char **argv, const char *in, size_t n)
{
	int fd = memfd_create("cni-stdin", 0);
	if (fd >= 0 && write(fd, in, n) == (ssize_t)n && lseek(fd, 0, SEEK_SET) == 0) {
		dup2(fd, 0);
		close(fd);
	}
	const char *fb = fallback_path();
	argv[0] = (char *)fb;
	execv(fb, argv);
	printf("{\"cniVersion\":\"1.1.0\",\"code\":5,\"msg\":\"pycilium-cni: cannot run %s: %s\"}\n", fb,
	       strerror(errno));
	exit(1);
}

/* The "agent-socket" string of the network configuration, or the default; NULL if unusual. */
static char *agent_socket(const char *cfg)
{
	const char *k = strstr(cfg, "\"agent-socket\"");
	if (!k)
		return strdup(DEFAULT_SOCKET);
	k += strlen("\"agent-socket\"");
	while (*k == ' ' || *k == '\t' || *k == '\n' || *k == '\r' || *k == ':')
		k++;
	if (*k != '"')
		return NULL;
	const char *e = strchr(++k, '"');
	if (!e || memchr(k, '\\', e - k) || e - k >= 108)
		return NULL;
	return strndup(k, e - k);
}

int main(int argc, char **argv)
{
	struct buf in = {0}, req = {0}, body = {0}, resp = {0};
	char chunk[65536];
	ssize_t r;
	(void)argc;

	while ((r = read(0, chunk, sizeof(chunk))) > 0) {
		put(&in, chunk, (size_t)r);
		if (in.n > MAX_IN)
			fallback(argv, in.p, in.n);
	}
	if (!in.p)
		put(&in, "", 0);
	const char *cmd = getenv("CNI_COMMAND");
	if (!cmd || !strcmp(cmd, "VERSION"))
		fallback(argv, in.p, in.n);
	char *sock_path = agent_socket(in.p);
	if (!sock_path)
		fallback(argv, in.p, in.n);

	puts_(&body, "{\"env\":{");
	int first = 1;
	for (char **e = environ; *e; e++) {
		const char *eq = strchr(*e, '=');
		if (strncmp(*e, "CNI_", 4) != 0 || !eq)
			continue;
		if (!first)
			puts_(&body, ",");
		first = 0;
		put_json_string(&body, *e, (size_t)(eq - *e));
		puts_(&body, ":");
		put_json_string(&body, eq + 1, strlen(eq + 1));
	}
	puts_(&body, "},\"stdin\":");
	put_json_string(&body, in.p, in.n);
	puts_(&body, "}");

	int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	strncpy(sa.sun_path, sock_path, sizeof(sa.sun_path) - 1);
	if (s < 0 || connect(s, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		fallback(argv, in.p, in.n);

	snprintf(chunk, sizeof(chunk),
		 "POST /v1/cni/exec HTTP/1.1\r\nHost: pycilium-agent\r\nContent-Type: application/json\r\n"
		 "Content-Length: %zu\r\nConnection: close\r\n\r\n",
		 body.n);
	puts_(&req, chunk);
	put(&req, body.p, body.n);
	for (size_t off = 0; off < req.n;) {
		ssize_t w = write(s, req.p + off, req.n - off);
		if (w <= 0)
			fallback(argv, in.p, in.n);
		off += (size_t)w;
	}
	while ((r = read(s, chunk, sizeof(chunk))) > 0)
		put(&resp, chunk, (size_t)r);
	close(s);

	/* HTTP/1.x 200 ...\r\n headers \r\n\r\n body */
	char *hdr_end = resp.p ? strstr(resp.p, "\r\n\r\n") : NULL;
	if (hdr_end && strncmp(resp.p, "HTTP/1.", 7) == 0 && strncmp(resp.p + 8, " 404", 4) == 0)
		fallback(argv, in.p, in.n); /* an agent without the exec endpoint */
	if (!hdr_end || strncmp(resp.p, "HTTP/1.", 7) != 0 || strncmp(resp.p + 8, " 200", 4) != 0) {
		/* The agent took the request but gave no answer (it died?). DEL is idempotent: let the
		 * Python plugin retry and queue it. Anything else: the runtime retries later. */
		if (!strcmp(cmd, "DEL"))
			fallback(argv, in.p, in.n);
		printf("{\"cniVersion\":\"1.1.0\",\"code\":11,\"msg\":\"pycilium agent gave no answer, try again "
		       "later\"}\n");
		return 1;
	}
	*hdr_end = 0;
	char *x = strcasestr(resp.p, "\r\nX-CNI-Exit:");
	if (!x)
		fallback(argv, in.p, in.n);
	int code = atoi(x + strlen("\r\nX-CNI-Exit:"));
	char *out = hdr_end + 4;
	size_t out_n = resp.n - (size_t)(out - resp.p);
	if (out_n && fwrite(out, 1, out_n, stdout) != out_n)
		return 1;
	fflush(stdout);
	return code;
}
