/*
 * credits.h
 *		What src/credits.c (the drawdown of credits) and src/segments.c
 *		(plans in segments, the spend cap line) share: reading arrays of
 *		composite rows, and comparing numerics.
 */
#ifndef BILLING_CREDITS_H
#define BILLING_CREDITS_H

#include "postgres.h"

#include "access/tupdesc.h"
#include "utils/array.h"
#include "utils/numeric.h"

extern int	billing_attnum_of(TupleDesc desc, const char *name);
extern int	billing_rows_of(ArrayType *arr, TupleDesc *desc, Datum ***values, bool ***nulls);
extern int	billing_num_cmp(Numeric a, Numeric b);

#endif							/* BILLING_CREDITS_H */
