/* SPDX-License-Identifier: Apache-2.0 */
/* Little helpers shared by the ring consumer and the jsonl formatter: a record's fields sit at
 * offsets the ABI gives (events.h), not necessarily aligned for their type, so they are read
 * with memcpy (one load on x86 and arm64, no undefined behaviour). */
#ifndef TF_RDBYTES_H
#define TF_RDBYTES_H

#include <stdint.h>
#include <string.h>

static inline uint64_t u64_at(const uint8_t *p)
{
	uint64_t v;
	memcpy(&v, p, 8);
	return v;
}

static inline uint32_t u32_at(const uint8_t *p)
{
	uint32_t v;
	memcpy(&v, p, 4);
	return v;
}

static inline uint16_t u16_at(const uint8_t *p)
{
	uint16_t v;
	memcpy(&v, p, 2);
	return v;
}

#endif
