/*
 * varint.h
 *		The one varint of billing's packed formats: the delta cells of
 *		billing.usage_deltas (src/cells.c) and the day rows of
 *		billing.usage_days (src/store.c) both write integers as unsigned
 *		LEB128 (7 bits a byte, least significant first, the high bit set
 *		on every byte but the last) and signed ones in their zigzag form
 *		(0, -1, 1, -2, ... as 0, 1, 2, 3, ...), so that small magnitudes
 *		take one byte.  A 64-bit value takes at most 10 bytes.
 *
 * The formats are on disk: what these functions write must never change.
 */
#ifndef BILLING_VARINT_H
#define BILLING_VARINT_H

#define BILLING_VARINT_MAX 10

/* the zigzag form of v */
static inline uint64
billing_zigzag(int64 v)
{
	return ((uint64) v << 1) ^ (uint64) (v >> 63);
}

/* the value whose zigzag form is u */
static inline int64
billing_unzigzag(uint64 u)
{
	return (int64) ((u >> 1) ^ -(u & 1));
}

/* write v into buf (BILLING_VARINT_MAX bytes); returns the bytes written */
static inline int
billing_varint_put(unsigned char *buf, uint64 v)
{
	int			n = 0;

	while (v >= 0x80)
	{
		buf[n++] = (unsigned char) (v | 0x80);
		v >>= 7;
	}
	buf[n++] = (unsigned char) v;
	return n;
}

/*
 * Read a varint from *p (not past end) into *v and advance *p; false when
 * the bytes end first or run past BILLING_VARINT_MAX (the caller reports
 * the value as corrupt).
 */
static inline bool
billing_varint_get(const unsigned char **p, const unsigned char *end, uint64 *v)
{
	uint64		r = 0;

	for (int shift = 0; shift < 7 * BILLING_VARINT_MAX; shift += 7)
	{
		unsigned char c;

		if (*p >= end)
			return false;
		c = *(*p)++;
		r |= (uint64) (c & 0x7F) << shift;
		if ((c & 0x80) == 0)
		{
			*v = r;
			return true;
		}
	}
	return false;
}

#endif							/* BILLING_VARINT_H */
