/*
 * ingest_client.c: the client of the ingest() benchmark that sends its
 * batches the way a driver does (libpq, one prepared statement, the arrays
 * as binary parameters: what pgx, tokio-postgres or psycopg's binary mode
 * send), so that the benchmark times what the server does with a batch, not
 * how fast psql and the SQL lexer read 460 kB of array literals per call.
 *
 *   ingest_client FILE BATCH SOURCE
 *
 * FILE is COPY text output of (account_id, meter, quantity, ts[, ...]) with
 * ts as ISO 8601 with a UTC offset ("2026-12-07 02:05:39.32505+00").  Every
 * batch is converted to binary arrays first, as a consumer holds its events
 * in memory; then the batches go out as ingest(SOURCE, 1, k, ...) calls,
 * k = 1, 2, ..., one transaction each.  Prints "ACCEPTED MS": the accepted
 * total and the milliseconds of the sending loop.  Connects through the
 * PG* environment.  Built by bench_ingest.sh; not part of the extension.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "libpq-fe.h"

#define OID_INT8 20
#define OID_TEXT 25
#define OID_NUMERIC 1700
#define OID_TIMESTAMPTZ 1184

typedef struct Buf
{
	char	   *p;
	size_t		len;
	size_t		cap;
} Buf;

static void
die(const char *msg, const char *detail)
{
	fprintf(stderr, "ingest_client: %s%s%s\n", msg, detail ? ": " : "", detail ? detail : "");
	exit(1);
}

static void
put(Buf *b, const void *src, size_t n)
{
	if (b->len + n > b->cap)
	{
		b->cap = (b->len + n) * 2 + 1024;
		b->p = realloc(b->p, b->cap);
		if (b->p == NULL)
			die("out of memory", NULL);
	}
	memcpy(b->p + b->len, src, n);
	b->len += n;
}

/* a 2-, 4- or 8-byte integer in network order into out */
static void
be_bytes(unsigned char *out, uint64_t v, int len)
{
	for (int i = len - 1; i >= 0; i--, v >>= 8)
		out[i] = (unsigned char) v;
}

static void
put_be(Buf *b, uint64_t v, int len)
{
	unsigned char c[8];

	be_bytes(c, v, len);
	put(b, c, len);
}

#define put16(b, v) put_be((b), (uint16_t) (v), 2)
#define put32(b, v) put_be((b), (uint32_t) (v), 4)
#define put64(b, v) put_be((b), (uint64_t) (v), 8)

/* the header of a one-dimensional array without NULLs, its length 0 */
static void
array_header(Buf *b, uint32_t elem_oid)
{
	put32(b, 1);				/* ndim */
	put32(b, 0);				/* no NULLs */
	put32(b, elem_oid);
	put32(b, 0);				/* length: array_length() sets it */
	put32(b, 1);				/* lower bound */
}

/* set the length in the header array_header wrote at the start of b */
static void
array_length(Buf *b, int n)
{
	be_bytes((unsigned char *) b->p + 12, (uint32_t) n, 4);
}

/*
 * numeric's binary form of a decimal string ("-12.5"): ndigits, weight,
 * sign, dscale, then base-10000 digits, most significant first
 */
static void
put_numeric(Buf *b, const char *s)
{
	int			neg = 0,
				nint = 0,
				nfrac = 0;
	const char *ip,
			   *fp = NULL;
	char		digs[128];		/* the integer digits padded left to 4k, then the fraction's padded right */
	int			nd = 0,
				pad,
				ngroups,
				first,
				last,
				weight;
	uint16_t	groups[32];

	if (*s == '-' || *s == '+')
		neg = (*s++ == '-');
	ip = s;
	while (ip[nint] >= '0' && ip[nint] <= '9')
		nint++;
	if (ip[nint] == '.')
	{
		fp = ip + nint + 1;
		while (fp[nfrac] >= '0' && fp[nfrac] <= '9')
			nfrac++;
	}
	if (nint + nfrac + 8 > (int) sizeof(digs))
		die("quantity too long", s);
	pad = (4 - nint % 4) % 4;
	for (int i = 0; i < pad; i++)
		digs[nd++] = '0';
	memcpy(digs + nd, ip, nint);
	nd += nint;
	if (nfrac > 0)
		memcpy(digs + nd, fp, nfrac);
	nd += nfrac;
	while (nd % 4 != 0)
		digs[nd++] = '0';
	ngroups = nd / 4;
	for (int g = 0; g < ngroups; g++)
		groups[g] = (uint16_t) ((digs[4 * g] - '0') * 1000 + (digs[4 * g + 1] - '0') * 100 +
								(digs[4 * g + 2] - '0') * 10 + (digs[4 * g + 3] - '0'));
	/* weight of group 0: the integer part's groups less one */
	weight = (nint + pad) / 4 - 1;
	first = 0;
	while (first < ngroups && groups[first] == 0)
		first++;
	last = ngroups - 1;
	while (last >= first && groups[last] == 0)
		last--;
	if (first > last)
	{
		put32(b, 8);
		put16(b, 0);
		put16(b, 0);
		put16(b, 0);
		put16(b, (uint16_t) nfrac);
		return;
	}
	put32(b, (uint32_t) (8 + 2 * (last - first + 1)));
	put16(b, (uint16_t) (last - first + 1));
	put16(b, (uint16_t) (int16_t) (weight - first));
	put16(b, neg ? 0x4000 : 0x0000);
	put16(b, (uint16_t) nfrac);
	for (int g = first; g <= last; g++)
		put16(b, groups[g]);
}

/* days from 1970-01-01 to y-m-d (proleptic Gregorian) */
static int64_t
days_from_civil(int64_t y, unsigned m, unsigned d)
{
	int64_t		era;
	unsigned	yoe,
				doy,
				doe;

	y -= m <= 2;
	era = (y >= 0 ? y : y - 399) / 400;
	yoe = (unsigned) (y - era * 400);
	doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
	doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
	return era * 146097 + (int64_t) doe - 719468;
}

/* timestamptz's binary form: microseconds since 2000-01-01 00:00 UTC */
static int64_t
parse_ts(const char *s)
{
	int			y,
				mo,
				d,
				h,
				mi,
				sec,
				n = 0,
				oh = 0,
				om = 0;
	int64_t		usec = 0,
				scale = 100000,
				t;
	const char *p;

	if (sscanf(s, "%d-%d-%d %d:%d:%d%n", &y, &mo, &d, &h, &mi, &sec, &n) != 6)
		die("bad timestamp", s);
	p = s + n;
	if (*p == '.')
		for (p++; *p >= '0' && *p <= '9'; p++, scale /= 10)
			usec += (*p - '0') * scale;
	if (*p == '+' || *p == '-')
	{
		int			sign = (*p == '-') ? -1 : 1;

		if (sscanf(p + 1, "%2d:%2d", &oh, &om) < 1)
			die("bad UTC offset", s);
		oh *= sign;
		om *= sign;
	}
	else
		die("timestamp without a UTC offset", s);
	t = (days_from_civil(y, (unsigned) mo, (unsigned) d) - 10957) * 86400 +
		h * 3600 + mi * 60 + sec - oh * 3600 - om * 60;
	return t * 1000000 + usec;
}

typedef struct Batch
{
	Buf			arr[4];			/* account_ids, meters, quantities, ts */
	int			n;
} Batch;

int
main(int argc, char **argv)
{
	FILE	   *f;
	char		line[1024];
	int			batch_rows;
	Batch	   *batches = NULL;
	int			nbatches = 0,
				cap = 0;
	PGconn	   *conn;
	PGresult   *res;
	struct timespec t0,
				t1;
	long long	accepted = 0;
	const Oid	types[7] = {OID_TEXT, 23, OID_INT8, 1016, 1009, 1231, 1185};
	const uint32_t elem[4] = {OID_INT8, OID_TEXT, OID_NUMERIC, OID_TIMESTAMPTZ};

	if (argc != 4)
		die("usage: ingest_client FILE BATCH SOURCE", NULL);
	batch_rows = atoi(argv[2]);
	if (batch_rows <= 0)
		die("BATCH must be positive", argv[2]);
	if ((f = fopen(argv[1], "r")) == NULL)
		die("cannot open", argv[1]);

	/* every batch in binary, before the clock starts */
	while (fgets(line, sizeof(line), f))
	{
		char	   *col[4],
				   *p = line;
		Batch	   *b;
		int64_t		account;
		size_t		mlen;

		for (int i = 0; i < 4; i++)
		{
			col[i] = p;
			p = strpbrk(p, "\t\n");
			if (p == NULL && i < 3)
				die("short line", line);
			if (p)
				*p++ = '\0';
		}
		if (nbatches == 0 || batches[nbatches - 1].n == batch_rows)
		{
			if (nbatches == cap)
			{
				cap = cap * 2 + 16;
				batches = realloc(batches, cap * sizeof(Batch));
				if (batches == NULL)
					die("out of memory", NULL);
			}
			memset(&batches[nbatches], 0, sizeof(Batch));
			for (int a = 0; a < 4; a++)
				array_header(&batches[nbatches].arr[a], elem[a]);
			nbatches++;
		}
		b = &batches[nbatches - 1];
		b->n++;
		account = strtoll(col[0], NULL, 10);
		put32(&b->arr[0], 8);
		put64(&b->arr[0], (uint64_t) account);
		mlen = strlen(col[1]);
		put32(&b->arr[1], (uint32_t) mlen);
		put(&b->arr[1], col[1], mlen);
		put_numeric(&b->arr[2], col[2]);
		put32(&b->arr[3], 8);
		put64(&b->arr[3], (uint64_t) parse_ts(col[3]));
	}
	fclose(f);

	conn = PQconnectdb("");
	if (PQstatus(conn) != CONNECTION_OK)
		die("cannot connect", PQerrorMessage(conn));
	res = PQprepare(conn, "ingest",
					"SELECT accepted FROM billing.ingest($1, $2, $3, $4, $5, $6, $7)",
					7, types);
	if (PQresultStatus(res) != PGRES_COMMAND_OK)
		die("PREPARE failed", PQerrorMessage(conn));
	PQclear(res);

	/* the arrays' lengths, known now */
	for (int k = 0; k < nbatches; k++)
		for (int a = 0; a < 4; a++)
			array_length(&batches[k].arr[a], batches[k].n);

	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (int k = 0; k < nbatches; k++)
	{
		unsigned char part[4],
					off[8];
		const char *values[7];
		int			lengths[7];
		const int	formats[7] = {1, 1, 1, 1, 1, 1, 1};

		be_bytes(part, 1, 4);
		be_bytes(off, (uint64_t) (k + 1), 8);
		values[0] = argv[3];
		lengths[0] = (int) strlen(argv[3]);
		values[1] = (const char *) part;
		lengths[1] = 4;
		values[2] = (const char *) off;
		lengths[2] = 8;
		for (int a = 0; a < 4; a++)
		{
			values[3 + a] = batches[k].arr[a].p;
			lengths[3 + a] = (int) batches[k].arr[a].len;
		}
		res = PQexecPrepared(conn, "ingest", 7, values, lengths, formats, 0);
		if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1)
			die("ingest() failed", PQerrorMessage(conn));
		accepted += atoll(PQgetvalue(res, 0, 0));
		PQclear(res);
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	printf("%lld %.0f\n", accepted,
		   (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6);
	PQfinish(conn);
	return 0;
}
