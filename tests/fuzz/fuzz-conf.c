/* Fuzzes the INI config loader, instance validation included. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "conf.h"

struct capd_settings *capd_settings;
const char *capd_config_path;
double capd_started;
int capd_reload(capd_reloaded_fn *done, void *arg, char **why) { (void)done; (void)arg; (void)why; return 0; }

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char *text = malloc(size + 1), *why = NULL;

	memcpy(text, data, size);
	text[size] = '\0';
	conf_free(conf_load_string(text, "fuzz.conf", "/tmp", &why));
	free(why);
	free(text);
	return 0;
}
