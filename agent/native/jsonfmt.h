/* SPDX-License-Identifier: Apache-2.0 */
/* The compiled jsonl formatter (jsonfmt.c), as the ring consumer (fastring.c) calls it. */
#ifndef TF_JSONFMT_H
#define TF_JSONFMT_H

#include <stddef.h>
#include <stdint.h>

struct tf_jfmt;

/* Format one ring record as its JSON line into the output buffer (written to the output fd
 * when the buffer fills). Returns 1 when written, 0 when Python must make this line (the
 * reason is counted), never fails otherwise. */
int tf_jfmt_record(struct tf_jfmt *j, const uint8_t *d, size_t size, uint64_t now_ns);

#endif
