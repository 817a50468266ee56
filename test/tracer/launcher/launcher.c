/*
 * A stand-in for Datadog's apm-inject launcher (launcher.preload.so) in the end-to-end tests:
 * Datadog's image cannot be fetched here, so the tests build this one with the machine's C
 * compiler and ship it in an apm-inject image of Datadog's layout. Like the real launcher it is
 * loaded into every dynamically linked process of the container by the dynamic linker, through
 * /etc/ld.so.preload and LD_PRELOAD, and makes Node.js processes load the JavaScript tracer of
 * the injector layout: it appends --require=<library>/node_modules/dd-trace/init to
 * NODE_OPTIONS before node reads it. Every other process is left alone.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define JS_INIT "/opt/datadog/apm/library/js/node_modules/dd-trace/init"

__attribute__((constructor)) static void launch(void)
{
	char exe[4096];
	ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
	if (n <= 0)
		return;
	exe[n] = '\0';
	const char *base = strrchr(exe, '/');
	base = base ? base + 1 : exe;
	if (strcmp(base, "node") != 0 && strcmp(base, "nodejs") != 0)
		return;
	/* No tracer mounted for this language: run the program unchanged. */
	if (access(JS_INIT ".js", R_OK) != 0)
		return;
	const char *add = "--require=" JS_INIT;
	const char *old = getenv("NODE_OPTIONS");
	if (old != NULL && strstr(old, add) != NULL)
		return;
	size_t len = (old != NULL ? strlen(old) + 1 : 0) + strlen(add) + 1;
	char *v = malloc(len);
	if (v == NULL)
		return;
	snprintf(v, len, "%s%s%s", old != NULL ? old : "", old != NULL && *old != '\0' ? " " : "", add);
	setenv("NODE_OPTIONS", v, 1);
	free(v);
}
