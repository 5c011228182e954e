/* slime_router_core._speedups: one C pass over a reply's tokens where Python needs several.
 *
 * Every function here has a pure-Python reference in slime_router_core/speedups.py with the same results
 * (tests/test_speedups.py checks both on generated inputs); speedups.py uses this module when it was built.
 * The per-token work of a /generate reply (checking the ids and the [logprob, id, ...] entries, splitting them
 * into ids and logprobs, the text of each token) was ~15 passes at C speed, each with Python's per-object
 * overhead, and a Python loop per token after a partial character; here it is one pass each.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* ids_problem(ids, triples, vocab_size, stream) -> None | (code, detail)
 *
 * ids: the reply's output_ids or None; triples: its output_token_logprobs or None; vocab_size: int or None.
 * code 1: output_ids is not a list of exact ints; 2: output_token_logprobs is not a list of lists of >= 2 items
 * whose second item is an exact int; 3: the ids disagree (output_ids must end with the logprob ids, or, for a
 * stream chunk, either may end with the other); 4: an id outside [0, vocab_size) -- detail is that id (the
 * first in output_ids, else in the logprob ids). */

static int
id_in_range(PyObject *v, long long vocab)
{
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow)
        return 0;
    return x >= 0 && x < vocab;
}

/* does seq (n items, got via get(i)) end with the m items of tail? */
static int
ends_with_ids(PyObject *seq, int seq_is_triples, PyObject *tail, int tail_is_triples)
{
    Py_ssize_t n = PyList_GET_SIZE(seq), m = PyList_GET_SIZE(tail);
    if (m > n)
        return 0;
    for (Py_ssize_t i = 0; i < m; i++) {
        PyObject *a = PyList_GET_ITEM(seq, n - m + i);
        PyObject *b = PyList_GET_ITEM(tail, i);
        if (seq_is_triples)
            a = PyList_GET_ITEM(a, 1);
        if (tail_is_triples)
            b = PyList_GET_ITEM(b, 1);
        int eq = PyObject_RichCompareBool(a, b, Py_EQ);
        if (eq < 0)
            return -1;
        if (!eq)
            return 0;
    }
    return 1;
}

static PyObject *
problem(int code, PyObject *detail)
{
    return Py_BuildValue("(iO)", code, detail);
}

static PyObject *
ids_problem(PyObject *self, PyObject *args)
{
    PyObject *ids, *triples, *vocab_obj;
    int stream;
    if (!PyArg_ParseTuple(args, "OOOp", &ids, &triples, &vocab_obj, &stream))
        return NULL;
    long long vocab = -1;
    if (vocab_obj != Py_None) {
        vocab = PyLong_AsLongLong(vocab_obj);
        if (vocab == -1 && PyErr_Occurred())
            return NULL;
    }
    if (ids != Py_None) {
        if (!PyList_Check(ids))
            return problem(1, Py_None);
        Py_ssize_t n = PyList_GET_SIZE(ids);
        for (Py_ssize_t i = 0; i < n; i++)
            if (!PyLong_CheckExact(PyList_GET_ITEM(ids, i)))
                return problem(1, Py_None);
    }
    if (triples != Py_None) {
        if (!PyList_Check(triples))
            return problem(2, Py_None);
        Py_ssize_t n = PyList_GET_SIZE(triples);
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *t = PyList_GET_ITEM(triples, i);
            if (!PyList_Check(t) || PyList_GET_SIZE(t) < 2 || !PyLong_CheckExact(PyList_GET_ITEM(t, 1)))
                return problem(2, Py_None);
        }
        if (ids != Py_None) {
            int ok = ends_with_ids(ids, 0, triples, 1);
            if (ok < 0)
                return NULL;
            if (!ok && stream) {
                ok = ends_with_ids(triples, 1, ids, 0);
                if (ok < 0)
                    return NULL;
            }
            if (!ok)
                return problem(3, Py_None);
        }
    }
    if (vocab_obj != Py_None) {
        if (ids != Py_None) {
            Py_ssize_t n = PyList_GET_SIZE(ids);
            for (Py_ssize_t i = 0; i < n; i++) {
                PyObject *v = PyList_GET_ITEM(ids, i);
                if (!id_in_range(v, vocab))
                    return problem(4, v);
            }
        }
        if (triples != Py_None) {
            Py_ssize_t n = PyList_GET_SIZE(triples);
            for (Py_ssize_t i = 0; i < n; i++) {
                PyObject *v = PyList_GET_ITEM(PyList_GET_ITEM(triples, i), 1);
                if (!id_in_range(v, vocab))
                    return problem(4, v);
            }
        }
    }
    Py_RETURN_NONE;
}

/* split_logprobs(triples) -> (ids, logprobs) | None
 *
 * [[logprob, id, ...], ...] -> ([id, ...], [logprob, ...]) with None logprobs as NaN; None (the caller's
 * general path decides) unless every entry is a list of >= 2 items with an exact int id and a logprob that is
 * an exact float, an exact int or None. */
static PyObject *
split_logprobs(PyObject *self, PyObject *triples)
{
    if (!PyList_Check(triples))
        Py_RETURN_NONE;
    Py_ssize_t n = PyList_GET_SIZE(triples);
    PyObject *ids = PyList_New(n);
    PyObject *lps = PyList_New(n);
    PyObject *nan = NULL;
    if (ids == NULL || lps == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = PyList_GET_ITEM(triples, i);
        if (!PyList_Check(t) || PyList_GET_SIZE(t) < 2)
            goto odd;
        PyObject *lp = PyList_GET_ITEM(t, 0), *id = PyList_GET_ITEM(t, 1);
        if (!PyLong_CheckExact(id))
            goto odd;
        if (lp == Py_None) {
            if (nan == NULL && (nan = PyFloat_FromDouble(Py_NAN)) == NULL)
                goto fail;
            lp = nan;
        }
        else if (!PyFloat_CheckExact(lp) && !PyLong_CheckExact(lp))
            goto odd;
        Py_INCREF(id);
        PyList_SET_ITEM(ids, i, id);
        Py_INCREF(lp);
        PyList_SET_ITEM(lps, i, lp);
    }
    Py_XDECREF(nan);
    return Py_BuildValue("(NN)", ids, lps);
odd:
    Py_XDECREF(nan);
    Py_DECREF(ids);
    Py_DECREF(lps);
    Py_RETURN_NONE;
fail:
    Py_XDECREF(nan);
    Py_XDECREF(ids);
    Py_XDECREF(lps);
    return NULL;
}

/* token_pieces(ids, piece_of, whole_piece, token_bytes) -> (pieces, text, widths)
 *
 * The text of each token of a byte-level tokenizer, such that the pieces concatenate to the exact decoding:
 * piece_of maps an id to its text when its bytes are whole UTF-8 characters, or to False (filled on a miss by
 * whole_piece(id), which returns that value). A token after which bytes of a character are still pending gets ""
 * and its text goes to the token that completes the character (UTF-8 decoded with "replace", as Python's
 * incremental decoder does: this calls the same decoder). text = "".join(pieces), widths = their lengths. */
static PyObject *
token_pieces(PyObject *self, PyObject *args)
{
    PyObject *ids, *piece_of, *whole_piece, *token_bytes;
    if (!PyArg_ParseTuple(args, "O!O!OO", &PyList_Type, &ids, &PyDict_Type, &piece_of, &whole_piece, &token_bytes))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(ids);
    PyObject *pieces = PyList_New(n), *widths = PyList_New(n), *empty = PyUnicode_New(0, 0);
    PyObject *pending = NULL;  /* bytes of an unfinished character */
    PyObject *carry = NULL;    /* text decoded since the last character boundary */
    PyObject *text = NULL;
    if (pieces == NULL || widths == NULL || empty == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *tid = PyList_GET_ITEM(ids, i);
        PyObject *piece = NULL;
        if (pending == NULL) {
            PyObject *p = PyDict_GetItemWithError(piece_of, tid);  /* borrowed */
            if (p == NULL) {
                if (PyErr_Occurred())
                    goto fail;
                PyObject *filled = PyObject_CallOneArg(whole_piece, tid);
                if (filled == NULL)
                    goto fail;
                Py_DECREF(filled);  /* piece_of holds it now */
                p = PyDict_GetItemWithError(piece_of, tid);
                if (p == NULL) {
                    if (!PyErr_Occurred())
                        PyErr_SetString(PyExc_RuntimeError, "whole_piece did not fill piece_of");
                    goto fail;
                }
            }
            if (PyUnicode_CheckExact(p)) {
                Py_INCREF(p);
                piece = p;
            }
        }
        if (piece == NULL) {  /* a partial character: decode the pending bytes + this token's */
            PyObject *b = PyObject_CallOneArg(token_bytes, tid);
            if (b == NULL)
                goto fail;
            if (!PyBytes_Check(b)) {
                Py_DECREF(b);
                PyErr_SetString(PyExc_TypeError, "token_bytes must return bytes");
                goto fail;
            }
            if (pending != NULL) {
                PyBytes_Concat(&pending, b);
                Py_DECREF(b);
                if (pending == NULL)
                    goto fail;
            }
            else
                pending = b;
            Py_ssize_t consumed = 0, len = PyBytes_GET_SIZE(pending);
            PyObject *dec = PyUnicode_DecodeUTF8Stateful(PyBytes_AS_STRING(pending), len, "replace", &consumed);
            if (dec == NULL)
                goto fail;
            if (carry == NULL)
                carry = dec;
            else {
                PyObject *joined = PyUnicode_Concat(carry, dec);
                Py_DECREF(dec);
                Py_SETREF(carry, joined);
                if (carry == NULL)
                    goto fail;
            }
            if (consumed < len) {  /* still inside a character: this token gets "" */
                PyObject *rest = PyBytes_FromStringAndSize(PyBytes_AS_STRING(pending) + consumed, len - consumed);
                Py_SETREF(pending, rest);
                if (pending == NULL)
                    goto fail;
                Py_INCREF(empty);
                piece = empty;
            }
            else {
                Py_CLEAR(pending);
                piece = carry;
                carry = NULL;
            }
        }
        PyList_SET_ITEM(pieces, i, piece);
        PyObject *w = PyLong_FromSsize_t(PyUnicode_GET_LENGTH(piece));
        if (w == NULL)
            goto fail;
        PyList_SET_ITEM(widths, i, w);
    }
    if (pending != NULL) {  /* the ids end inside a character: the last token gets the rest, replaced */
        PyObject *dec = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(pending), PyBytes_GET_SIZE(pending), "replace");
        if (dec == NULL)
            goto fail;
        PyObject *last = carry != NULL ? PyUnicode_Concat(carry, dec) : (Py_INCREF(dec), dec);
        Py_DECREF(dec);
        if (last == NULL)
            goto fail;
        PyObject *w = PyLong_FromSsize_t(PyUnicode_GET_LENGTH(last));
        if (w == NULL) {
            Py_DECREF(last);
            goto fail;
        }
        PyList_SetItem(pieces, n - 1, last);
        PyList_SetItem(widths, n - 1, w);
        Py_CLEAR(pending);
        Py_CLEAR(carry);
    }
    text = PyUnicode_Join(empty, pieces);
    if (text == NULL)
        goto fail;
    Py_DECREF(empty);
    return Py_BuildValue("(NNN)", pieces, text, widths);
fail:
    Py_XDECREF(pieces);
    Py_XDECREF(widths);
    Py_XDECREF(empty);
    Py_XDECREF(pending);
    Py_XDECREF(carry);
    return NULL;
}

/* pack(values, typecode) -> bytes: the machine representation of array(typecode, values) for a list or tuple
 * (array(typecode, pack(...)) equals array(typecode, values)), one C pass instead of array's per-item argument
 * parsing. Typecodes "i" (int32), "f" (float32), "B", "H", "I" (unsigned 8/16/32 bits); like array: a value out of
 * range raises OverflowError, a non-integer for an integer type TypeError. */
static PyObject *
pack(PyObject *self, PyObject *args)
{
    PyObject *values;
    int tc;
    if (!PyArg_ParseTuple(args, "OC", &values, &tc))
        return NULL;
    Py_ssize_t size;
    switch (tc) {
    case 'B': size = 1; break;
    case 'H': size = 2; break;
    case 'i': case 'I': case 'f': size = 4; break;
    default:
        PyErr_Format(PyExc_ValueError, "pack: unsupported typecode %c", tc);
        return NULL;
    }
    PyObject *seq = PySequence_Fast(values, "pack: a list or tuple is expected");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * size);
    if (out == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    char *buf = PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = items[i];
        if (tc == 'f') {
            double d = PyFloat_AsDouble(v);
            if (d == -1.0 && PyErr_Occurred())
                goto fail;
            float f = (float)d;
            memcpy(buf + 4 * i, &f, 4);
            continue;
        }
        if (PyFloat_Check(v)) {  /* array refuses floats for integer types */
            PyErr_SetString(PyExc_TypeError, "pack: an integer is required (got type float)");
            goto fail;
        }
        long long x = PyLong_AsLongLong(v);
        if (x == -1 && PyErr_Occurred())
            goto fail;
        if (tc == 'i') {
            if (x < INT32_MIN || x > INT32_MAX)
                goto overflow;
            int32_t y = (int32_t)x;
            memcpy(buf + 4 * i, &y, 4);
        }
        else if (tc == 'I') {
            if (x < 0 || x > UINT32_MAX)
                goto overflow;
            uint32_t y = (uint32_t)x;
            memcpy(buf + 4 * i, &y, 4);
        }
        else if (tc == 'H') {
            if (x < 0 || x > UINT16_MAX)
                goto overflow;
            uint16_t y = (uint16_t)x;
            memcpy(buf + 2 * i, &y, 2);
        }
        else {
            if (x < 0 || x > UINT8_MAX)
                goto overflow;
            buf[i] = (char)(uint8_t)x;
        }
    }
    Py_DECREF(seq);
    return out;
overflow:
    PyErr_Format(PyExc_OverflowError, "pack: value out of range for typecode %c", tc);
fail:
    Py_DECREF(seq);
    Py_DECREF(out);
    return NULL;
}

static PyMethodDef methods[] = {
    {"ids_problem", ids_problem, METH_VARARGS,
     "ids_problem(ids, triples, vocab_size, stream) -> None | (code, detail): see speedups.py"},
    {"split_logprobs", split_logprobs, METH_O,
     "split_logprobs(triples) -> (ids, logprobs) | None: see speedups.py"},
    {"token_pieces", token_pieces, METH_VARARGS,
     "token_pieces(ids, piece_of, whole_piece, token_bytes) -> (pieces, text, widths): see speedups.py"},
    {"pack", pack, METH_VARARGS, "pack(values, typecode) -> bytes: see speedups.py"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_speedups", "C versions of slime_router_core.speedups (same results).", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
