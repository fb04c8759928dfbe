/*
 * Fuzzes what the JSON-RPC handlers do with untrusted params: the request
 * is decoded as the control server decodes it, and its params go through
 * instance_check(), the validation instance.add runs for every type before
 * anything is bound or opened.
 */
#include <jansson.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "capd.h"
#include "instance.h"

struct capd_settings *capd_settings;
const char *capd_config_path;
double capd_started;
int capd_reload(capd_reloaded_fn *done, void *arg, char **why) { (void)done; (void)arg; (void)why; return 0; }

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	json_t *req = json_loadb((const char *)data, size, JSON_REJECT_DUPLICATES, NULL);
	json_t *params = json_object_get(req, "params");
	char *why = NULL;

	if (json_is_object(params))
		instance_check(params, NULL, NULL, 0, NULL, &why);
	free(why);
	json_decref(req);
	return 0;
}
