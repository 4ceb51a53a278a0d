/*
 * gradagg._kkt: the K x K solvers of gradagg for host memory, in C.
 *
 * The same algorithms as the torch implementations in gradagg/solvers (the reference, used on
 * other devices and when this module is not built): on CPU each torch operation on a K x K matrix
 * costs microseconds of dispatch, and a solver makes hundreds of them, while the arithmetic takes
 * nanoseconds. Everything here is double precision on row-major, contiguous buffers whose
 * addresses the Python side passes as integers (tensor.data_ptr()) after checking dtype, device
 * and layout.
 *
 * Status codes returned to Python: 0 every problem converged; 1 the problem holds NaN or Inf (the
 * outputs are NaN); 2 some problem ran out of its iteration budget; 3 out of memory; 4 this case
 * is left to the torch implementation.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define OK 0
#define NONFINITE 1
#define UNCONVERGED 2
#define NOMEM 3
#define FALLBACK 4 /* no answer here: the caller takes the torch path */

/* Relative tolerance of the sign tests of the active-set method (solvers.active_set.SIGN_TOL). */
static const double SIGN_TOL = 1e-11;

static int all_finite(const double *x, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

static void fill_nan(double *x, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) x[i] = NAN;
}

/* In-place Cholesky factor (lower triangle) of the n x n row-major m; nonzero if not positive definite. */
static int cholesky(double *m, int n) {
    for (int j = 0; j < n; j++) {
        double d = m[j * n + j];
        const double *rj = m + (size_t)j * n;
        for (int p = 0; p < j; p++) d -= rj[p] * rj[p];
        if (!(d > 0.0)) return 1;
        d = sqrt(d);
        m[j * n + j] = d;
        for (int i = j + 1; i < n; i++) {
            double *ri = m + (size_t)i * n;
            double s = ri[j];
            for (int p = 0; p < j; p++) s -= ri[p] * rj[p];
            ri[j] = s / d;
        }
    }
    return 0;
}

/* Solves L Lᵀ x = b in place for the factor of ``cholesky``. */
static void cholesky_solve(const double *l, int n, double *x) {
    for (int i = 0; i < n; i++) {
        double s = x[i];
        for (int p = 0; p < i; p++) s -= l[i * n + p] * x[p];
        x[i] = s / l[i * n + i];
    }
    for (int i = n - 1; i >= 0; i--) {
        double s = x[i];
        for (int p = i + 1; p < n; p++) s -= l[p * n + i] * x[p];
        x[i] = s / l[i * n + i];
    }
}

/* Work space of the masked solves: an index list, a factor and a right-hand side. */
typedef struct {
    int k;
    int *idx;
    double *m;
    double *rhs;
} Masked;

static int masked_init(Masked *w, int k) {
    w->k = k;
    w->idx = malloc(sizeof(int) * (size_t)k);
    w->m = malloc(sizeof(double) * (size_t)k * (size_t)k);
    w->rhs = malloc(sizeof(double) * (size_t)k);
    return w->idx && w->m && w->rhs;
}

static void masked_free(Masked *w) {
    free(w->idx);
    free(w->m);
    free(w->rhs);
}

/* Factors A_FF for the free set F; returns its size, or -1 if A_FF is not positive definite. */
static int masked_factor(Masked *w, const double *a, const unsigned char *free_) {
    int k = w->k, n = 0;
    for (int i = 0; i < k; i++)
        if (free_[i]) w->idx[n++] = i;
    for (int r = 0; r < n; r++)
        for (int c = 0; c <= r; c++) w->m[r * n + c] = a[(size_t)w->idx[r] * k + w->idx[c]];
    return cholesky(w->m, n) ? -1 : n;
}

/* z = (A_FF⁻¹ q_F on F, 0 elsewhere) with the factor of ``masked_factor`` (n = |F|). */
static void masked_apply(Masked *w, int n, const double *q, double *z) {
    for (int r = 0; r < n; r++) w->rhs[r] = q[w->idx[r]];
    cholesky_solve(w->m, n, w->rhs);
    memset(z, 0, sizeof(double) * (size_t)w->k);
    for (int r = 0; r < n; r++) z[w->idx[r]] = w->rhs[r];
}

/* ------------------------------------------------------------------------------------------------
 * Nonnegative QP  min ½ yᵀAy − qᵀy, y ≥ 0: block principal pivoting, handing over to Lawson–Hanson
 * after three iterations without fewer violations (see gradagg/solvers/active_set.py, which this
 * follows step for step for one problem of the batch).
 */
typedef struct {
    int k;
    Masked ms;
    double *z, *descent, *tol, *ratio, *stepped, *lh_y, *abs_a, *unit, *yv;
    unsigned char *work, *blocked, *added, *bad, *lh_work, *start_work, *pivot_work;
} Nnqp;

static int nnqp_init(Nnqp *s, int k, const double *a) {
    memset(s, 0, sizeof(*s));
    s->k = k;
    if (!masked_init(&s->ms, k)) return 0;
    double **dv[] = {&s->z, &s->descent, &s->tol, &s->ratio, &s->stepped, &s->lh_y, &s->unit, &s->yv};
    for (size_t i = 0; i < sizeof(dv) / sizeof(dv[0]); i++)
        if (!(*dv[i] = malloc(sizeof(double) * (size_t)k))) return 0;
    unsigned char **bv[] = {&s->work, &s->blocked, &s->added, &s->bad, &s->lh_work, &s->start_work, &s->pivot_work};
    for (size_t i = 0; i < sizeof(bv) / sizeof(bv[0]); i++)
        if (!(*bv[i] = malloc((size_t)k))) return 0;
    if (!(s->abs_a = malloc(sizeof(double) * (size_t)k * (size_t)k))) return 0;
    for (size_t i = 0; i < (size_t)k * (size_t)k; i++) s->abs_a[i] = fabs(a[i]);
    for (int i = 0; i < k; i++) s->unit[i] = a[(size_t)i * k + i] > 0.5 ? 1.0 : 0.0;
    return 1;
}

static void nnqp_free(Nnqp *s) {
    masked_free(&s->ms);
    double *dv[] = {s->z, s->descent, s->tol, s->ratio, s->stepped, s->lh_y, s->unit, s->yv, s->abs_a};
    for (size_t i = 0; i < sizeof(dv) / sizeof(dv[0]); i++) free(dv[i]);
    unsigned char *bv[] = {s->work, s->blocked, s->added, s->bad, s->lh_work, s->start_work, s->pivot_work};
    for (size_t i = 0; i < sizeof(bv) / sizeof(bv[0]); i++) free(bv[i]);
}

/* One problem. y0 (may be NULL) warm-starts; the solution goes to out. Returns 1 if it converged
 * (out = the clamped solution), 0 if not (out = 0). */
static int nnqp_one(Nnqp *s, const double *a, const double *q, const double *qscale, const double *y0,
                    int max_iter, double *out) {
    const int k = s->k;
    double *y = s->yv, *z = s->z;
    for (int i = 0; i < k; i++) {
        s->work[i] = y0 ? y0[i] > 0.0 : q[i] > 0.0;
        y[i] = y0 ? (y0[i] > 0.0 ? y0[i] : 0.0) : 0.0;
        s->blocked[i] = s->added[i] = 0;
    }
    int lawson = 0, best = k + 1, backups = 3;
    memset(out, 0, sizeof(double) * (size_t)k);
    for (int it = 0; it < max_iter; it++) {
        int n = masked_factor(&s->ms, a, s->work);
        if (n < 0) return 0;
        masked_apply(&s->ms, n, q, z);
        double noise = 0.0;
        for (int i = 0; i < k; i++) noise += fabs(z[i]) * s->unit[i];
        int nbad = 0;
        for (int j = 0; j < k; j++) {
            const double *aj = a + (size_t)j * k, *abs_aj = s->abs_a + (size_t)j * k;
            double az = 0.0, absaz = 0.0;
            for (int i = 0; i < k; i++) {
                az += z[i] * aj[i];
                absaz += fabs(z[i]) * abs_aj[i];
            }
            s->descent[j] = q[j] - az;
            s->tol[j] = SIGN_TOL * (s->unit[j] * noise + absaz + qscale[j]) + DBL_MIN;
            int negative = s->work[j] && z[j] < 0.0;
            double bar = s->blocked[j] ? 1e3 * s->tol[j] : s->tol[j];
            s->bad[j] = negative || (!s->work[j] && s->descent[j] > bar);
            nbad += s->bad[j];
        }
        if (nbad == 0) {
            for (int i = 0; i < k; i++) out[i] = z[i] > 0.0 ? z[i] : 0.0;
            return 1;
        }
        if (nbad < best) backups = 3; else backups -= 1;
        if (nbad < best) best = nbad;
        int do_switch = !lawson && backups < 0;
        for (int i = 0; i < k; i++) s->pivot_work[i] = s->work[i] ^ s->bad[i];
        if (do_switch)
            for (int i = 0; i < k; i++) y[i] = (s->work[i] && z[i] > 0.0) ? z[i] : 0.0;
        int feasible = 1, bounced = 0, kept = 0;
        for (int i = 0; i < k; i++) {
            s->start_work[i] = y[i] > 0.0;
            if (s->work[i] && z[i] <= 0.0) feasible = 0;
            if (s->added[i] && z[i] <= 0.0) bounced = 1;
            if (s->added[i] && z[i] > 0.0) kept = 1;
        }
        if (lawson) {
            for (int i = 0; i < k; i++) s->blocked[i] = kept ? 0 : (s->blocked[i] || (bounced && s->added[i]));
        }
        /* The steepest descent beyond its own tolerance (first index on ties, like argmax). */
        int add = -1;
        double top = -INFINITY;
        for (int i = 0; i < k; i++) {
            double gain = (s->work[i] || s->blocked[i]) ? -INFINITY : s->descent[i] - s->tol[i];
            if (add < 0 || gain > top) {
                top = gain;
                add = i;
            }
        }
        if (!(top > 0.0)) add = -1;
        double alpha = INFINITY;
        for (int i = 0; i < k; i++) {
            if (s->work[i] && z[i] <= 0.0) {
                double den = y[i] - z[i];
                s->ratio[i] = y[i] / (den > DBL_MIN ? den : DBL_MIN);
            } else {
                s->ratio[i] = INFINITY;
            }
            if (s->ratio[i] < alpha) alpha = s->ratio[i];
        }
        alpha = alpha < 0.0 ? 0.0 : (alpha > 1.0 ? 1.0 : alpha);
        for (int i = 0; i < k; i++) {
            s->stepped[i] = y[i] + alpha * (z[i] - y[i]);
            if (feasible) {
                s->lh_y[i] = z[i];
                s->lh_work[i] = s->work[i] || i == add;
            } else {
                s->lh_y[i] = s->stepped[i];
                s->lh_work[i] = s->work[i] && s->stepped[i] > 0.0 && !(alpha == s->ratio[i]);
            }
            s->lh_y[i] *= s->lh_work[i];
        }
        if (do_switch) {
            for (int i = 0; i < k; i++) {
                s->lh_y[i] = y[i];
                s->lh_work[i] = s->start_work[i];
            }
        }
        lawson = lawson || do_switch;
        for (int i = 0; i < k; i++) s->added[i] = (feasible && lawson && !do_switch) ? i == add : 0;
        if (lawson) {
            memcpy(y, s->lh_y, sizeof(double) * (size_t)k);
            memcpy(s->work, s->lh_work, (size_t)k);
        } else {
            memcpy(s->work, s->pivot_work, (size_t)k);
        }
    }
    return 0;
}

/* The NNQP for A + diag(reg) and q, then up to ``refine`` proximal-point steps (solvers.active_set.
 * refined_nnqp), each problem stopping its refinement once a step moves it by ≤ 1e-9 of its size. */
static int nnqp_refined(Nnqp *s, const double *a, const double *q, const double *reg, const double *qscale,
                        int max_iter, int refine, double *y, double *prox_q, double *prev) {
    const int k = s->k;
    int converged = nnqp_one(s, a, q, qscale, NULL, max_iter, y);
    for (int r = 0; r < refine; r++) {
        memcpy(prev, y, sizeof(double) * (size_t)k);
        for (int i = 0; i < k; i++) prox_q[i] = q[i] + reg[i] * prev[i];
        converged &= nnqp_one(s, a, prox_q, qscale, prev, max_iter, y);
        double big = 0.0;
        int moved = 0;
        for (int i = 0; i < k; i++) big = fabs(y[i]) > big ? fabs(y[i]) : big;
        for (int i = 0; i < k; i++) moved |= !(fabs(y[i] - prev[i]) <= 1e-9 * big);
        if (!moved) break;
    }
    return converged;
}

/* ------------------------------------------------------------------------------------------------
 * Newton's method for A u = c ⊙ u^(−β), u > 0 (gradagg/solvers/barrier.py, step for step).
 */
#define TRIALS 31
static const double RESIDUAL_TOL = 1e-14, CONVERGED_TOL = 1e-6;

static double phi(double u, double beta) { return beta == 1.0 ? log(u) : pow(u, 1.0 - beta) / (1.0 - beta); }

static double objective(const double *a, const double *c, const double *u, int k, double beta) {
    double quad = 0.0, barrier = 0.0;
    for (int i = 0; i < k; i++) {
        double au = 0.0;
        for (int j = 0; j < k; j++) au += u[j] * a[(size_t)j * k + i];
        quad += au * u[i];
        barrier += c[i] * phi(u[i], beta);
    }
    return 0.5 * quad - barrier;
}

static double residual(const double *a, const double *c, const double *u, int k, double beta) {
    double worst = 0.0;
    for (int i = 0; i < k; i++) {
        double au = 0.0, absau = 0.0;
        for (int j = 0; j < k; j++) {
            au += u[j] * a[(size_t)j * k + i];
            absau += u[j] * fabs(a[(size_t)j * k + i]);
        }
        double rhs = c[i] * pow(u[i], -beta);
        double r = fabs(au - rhs) / (absau + rhs);
        if (isnan(r)) return NAN;
        if (r > worst) worst = r;
    }
    return worst;
}

/* Solves M x = b (n x n, row-major, destroyed) by Gaussian elimination with partial pivoting;
 * nonzero if M is singular. */
static int lu_solve(double *m, double *x, int n) {
    for (int col = 0; col < n; col++) {
        int piv = col;
        for (int r = col + 1; r < n; r++)
            if (fabs(m[r * n + col]) > fabs(m[piv * n + col])) piv = r;
        if (m[piv * n + col] == 0.0) return 1;
        if (piv != col) {
            for (int c = 0; c < n; c++) {
                double t = m[col * n + c];
                m[col * n + c] = m[piv * n + c];
                m[piv * n + c] = t;
            }
            double t = x[col];
            x[col] = x[piv];
            x[piv] = t;
        }
        for (int r = col + 1; r < n; r++) {
            double f = m[r * n + col] / m[col * n + col];
            if (f == 0.0) continue;
            for (int c = col; c < n; c++) m[r * n + c] -= f * m[col * n + c];
            x[r] -= f * x[col];
        }
    }
    for (int r = n - 1; r >= 0; r--) {
        double s = x[r];
        for (int c = r + 1; c < n; c++) s -= m[r * n + c] * x[c];
        x[r] = s / m[r * n + r];
    }
    return 0;
}

/* Returns 1 if converged; the best iterate goes to best. */
static int barrier_solve(const double *a, const double *c, const double *u0, int k, double beta, int max_iter,
                         double *best, double *work) {
    double *u = work, *grad = u + k, *step = grad + k, *trial = step + k, *full = trial + k, *chosen = full + k,
           *hess = chosen + k;
    memcpy(u, u0, sizeof(double) * (size_t)k);
    memcpy(best, u0, sizeof(double) * (size_t)k);
    double best_res = residual(a, c, u0, k, beta);
    int done = best_res <= RESIDUAL_TOL;
    for (int it = 0; it < max_iter && !done; it++) {
        for (int i = 0; i < k; i++) {
            double au = 0.0;
            for (int j = 0; j < k; j++) au += u[j] * a[(size_t)j * k + i];
            double upow = pow(u[i], -beta);
            grad[i] = au - c[i] * upow;
            for (int j = 0; j < k; j++) hess[(size_t)i * k + j] = a[(size_t)i * k + j];
            hess[(size_t)i * k + i] += beta * c[i] * pow(u[i], -beta - 1.0);
            step[i] = grad[i];
        }
        if (lu_solve(hess, step, k)) {
            for (int i = 0; i < k; i++) step[i] = NAN;
        }
        double slope = 0.0;
        for (int i = 0; i < k; i++) {
            step[i] = -step[i];
            slope += grad[i] * step[i];
        }
        double h_now = objective(a, c, u, k, beta);
        int accepted = 0, positive0 = 1;
        double length = 1.0;
        for (int t = 0; t < TRIALS; t++, length *= 0.5) {
            int positive = 1;
            for (int i = 0; i < k; i++) {
                trial[i] = u[i] + length * step[i];
                if (!(trial[i] > 0.0)) positive = 0;
            }
            if (t == 0) {
                positive0 = positive;
                for (int i = 0; i < k; i++) full[i] = trial[i] > DBL_MIN ? trial[i] : DBL_MIN;
            }
            if (!positive) continue;
            if (objective(a, c, trial, k, beta) <= h_now + 1e-4 * length * slope) {
                memcpy(chosen, trial, sizeof(double) * (size_t)k);
                accepted = 1;
                break;
            }
        }
        /* Near the root Armijo's test is rounding noise: take the full step when it halves the
         * residual, or when nothing passed the test but it still lowers the residual. */
        double res_now = residual(a, c, u, k, beta), res_full = residual(a, c, full, k, beta);
        int polish = positive0 && ((res_full <= 0.5 * res_now) || (!accepted && res_full < res_now));
        if (polish)
            for (int i = 0; i < k; i++) chosen[i] = u[i] + step[i];
        int stalled = !accepted && !polish;
        if (!stalled) memcpy(u, chosen, sizeof(double) * (size_t)k);
        double res = residual(a, c, u, k, beta);
        if (res < best_res) {
            memcpy(best, u, sizeof(double) * (size_t)k);
            best_res = res;
        }
        done = stalled || res <= RESIDUAL_TOL;
    }
    return best_res <= CONVERGED_TOL;
}

/* ------------------------------------------------------------------------------------------------
 * CAGrad's search for the multiplier λ (gradagg/_methods/cagrad.py, cagrad_direction_weights).
 */
#define CAGRAD_EPS 1e-12

static int cagrad_solve(const double *g, int k, double cc, int max_outer, double *w, Nnqp *s, double *a,
                        double *buf) {
    double *sc = buf, *b = sc + k, *sb = b + k, *q = sb + k, *qscale = q + k, *y = qscale + k, *ynew = y + k,
           *bsize = ynew + k, *ab0 = bsize + k, *ab1 = ab0 + k, *u = ab1 + k, *gn = u + k;
    unsigned char *free_ = (unsigned char *)(gn + (size_t)k * k), *support = free_ + k;
    double peak = 0.0;
    for (int i = 0; i < k; i++) peak = g[(size_t)i * k + i] > peak ? g[(size_t)i * k + i] : peak;
    if (peak < DBL_MIN) peak = DBL_MIN;
    double total = 0.0, root_mean = 0.0;
    for (int i = 0; i < k; i++) {
        double row = 0.0;
        for (int j = 0; j < k; j++) {
            gn[(size_t)i * k + j] = g[(size_t)i * k + j] / peak;
            row += gn[(size_t)i * k + j];
        }
        b[i] = row / k;
        total += b[i];
        double d = gn[(size_t)i * k + i];
        root_mean += sqrt(d > 0.0 ? d : 0.0);
    }
    root_mean /= k;
    double r = cc * sqrt(total > 0.0 ? total : 0.0) / sqrt((double)k), rr = r * r;
    /* Unit-diagonal scaling (solvers.active_set.scaled_gramian with eps = 1e-12). */
    for (int i = 0; i < k; i++) {
        double d = gn[(size_t)i * k + i];
        sc[i] = d > 0.0 ? 1.0 / sqrt(d) : 1.0;
    }
    for (int i = 0; i < k; i++)
        for (int j = 0; j < k; j++) a[(size_t)i * k + j] = gn[(size_t)i * k + j] * sc[i] * sc[j];
    for (int i = 0; i < k; i++) a[(size_t)i * k + i] += CAGRAD_EPS;
    double lo = INFINITY;
    for (int i = 0; i < k; i++) {
        double d = gn[(size_t)i * k + i];
        sb[i] = sc[i] * b[i];
        bsize[i] = sqrt(d > 0.0 ? d : 0.0) * root_mean;
        lo = b[i] < lo ? b[i] : lo;
        y[i] = 0.0;
        support[i] = 0;
    }
    /* The scaling changed A's entries: refresh the solver's copies of |A| and of the unit rows. */
    for (size_t i = 0; i < (size_t)k * (size_t)k; i++) s->abs_a[i] = fabs(a[i]);
    for (int i = 0; i < k; i++) s->unit[i] = a[(size_t)i * k + i] > 0.5 ? 1.0 : 0.0;
    double hi = INFINITY, lam = lo + 1.0;
    int done = rr <= 0.0;
    for (int it = 0; it < max_outer && !done; it++) {
        for (int i = 0; i < k; i++) {
            q[i] = sc[i] * (lam - b[i]);
            qscale[i] = sc[i] * (fabs(lam) + bsize[i]);
        }
        if (!nnqp_one(s, a, q, qscale, y, 3 * k + 30, ynew)) return UNCONVERGED;
        double psi = 0.0;
        for (int i = 0; i < k; i++) {
            double ay = 0.0;
            for (int j = 0; j < k; j++) ay += ynew[j] * a[(size_t)j * k + i];
            psi += ay * ynew[i];
            free_[i] = ynew[i] > 0.0;
        }
        if (psi < rr) lo = lam; else hi = lam;
        /* The root of ψ on the current free set: ψ(λ) = λ² αᵀs − 2λ αᵀ(sb) + βᵀ(sb). */
        int n = masked_factor(&s->ms, a, free_);
        if (n < 0) return UNCONVERGED;
        masked_apply(&s->ms, n, sc, ab0);
        masked_apply(&s->ms, n, sb, ab1);
        double qa = 0.0, qb = 0.0, qc = 0.0;
        for (int i = 0; i < k; i++) {
            qa += ab0[i] * sc[i];
            qb += ab0[i] * sb[i];
            qc += ab1[i] * sb[i];
        }
        double disc = qb * qb - qa * (qc - rr);
        double root = (qb + sqrt(disc > 0.0 ? disc : 0.0)) / qa;
        int inside = disc >= 0.0 && qa > 0.0 && root > lo && root < hi;
        int same = 1;
        for (int i = 0; i < k; i++) same &= free_[i] == support[i];
        int settled = same && fabs(root - lam) <= 1e-13 * (fabs(lam) + fabs(lo) + 1.0);
        done = fabs(psi - rr) <= 1e-12 * rr || settled;
        memcpy(y, ynew, sizeof(double) * (size_t)k);
        memcpy(support, free_, (size_t)k);
        double fallback = isfinite(hi) ? 0.5 * (lo + hi) : lo + 2.0 * (lam - lo > 1.0 ? lam - lo : 1.0);
        if (!done) lam = inside ? root : fallback;
    }
    if (!done) return UNCONVERGED;
    for (int i = 0; i < k; i++) u[i] = sc[i] * y[i];
    double norm_sq = 0.0;
    for (int i = 0; i < k; i++) {
        double gu = 0.0;
        for (int j = 0; j < k; j++) gu += gn[(size_t)i * k + j] * u[j];
        norm_sq += gu * u[i];
    }
    if (norm_sq < 0.0) norm_sq = 0.0;
    double scale = norm_sq <= 0.0 ? 0.0 : r / sqrt(norm_sq > DBL_MIN ? norm_sq : DBL_MIN);
    for (int i = 0; i < k; i++) w[i] = 1.0 / k + scale * u[i];
    return OK;
}

/* ------------------------------------------------------------------------------------------------
 * Whole weightings, from G to w, so that a CPU call makes one crossing into C.
 */

/* solvers.active_set.scaled_gramian: A = S G S + diag(reg), s_i = 1/sqrt(G_ii) (1 for zero rows),
 * reg_i = eps (zero_eps for zero rows). */
static void scale_gramian(const double *g, int k, double eps, double zero_eps, double *a, double *s, double *reg) {
    for (int i = 0; i < k; i++) {
        double d = g[(size_t)i * k + i];
        s[i] = d > 0.0 ? 1.0 / sqrt(d) : 1.0;
        reg[i] = d > 0.0 ? eps : zero_eps;
    }
    for (int i = 0; i < k; i++)
        for (int j = 0; j < k; j++) a[(size_t)i * k + j] = g[(size_t)i * k + j] * s[i] * s[j];
    for (int i = 0; i < k; i++) a[(size_t)i * k + i] += reg[i];
}

#define QP_EPS 1e-10
#define BARRIER_EPS 1e-15 /* FairGrad's and Nash-MTL's regularisation */
#define QP_REFINE 2

/* A scratch arena for the weightings: one allocation, carved up in order. */
typedef struct {
    double *base;
    size_t used, size;
} Arena;

static double *take(Arena *ar, size_t n) {
    double *p = ar->base + ar->used;
    ar->used += n;
    return p;
}

/* MGDA (gradagg/_methods/mgda.py): w = S y / Σ S y for the NNQP of A and q = s. */
static int mgda_solve(const double *g, int k, double *w, Arena *ar) {
    double *a = take(ar, (size_t)k * k), *s = take(ar, k), *reg = take(ar, k), *qs = take(ar, k),
           *y = take(ar, k), *b1 = take(ar, k), *b2 = take(ar, k);
    scale_gramian(g, k, QP_EPS, 1e-300, a, s, reg);
    for (int i = 0; i < k; i++) qs[i] = fabs(s[i]);
    Nnqp solver;
    if (!nnqp_init(&solver, k, a)) {
        nnqp_free(&solver);
        return NOMEM;
    }
    int ok = nnqp_refined(&solver, a, s, reg, qs, 3 * k + 30, QP_REFINE, y, b1, b2);
    nnqp_free(&solver);
    if (!ok) return UNCONVERGED;
    double total = 0.0;
    for (int i = 0; i < k; i++) {
        w[i] = s[i] * y[i];
        total += w[i];
    }
    for (int i = 0; i < k; i++) w[i] /= total;
    return OK;
}

/* UPGrad / DualProj (gradagg/_methods/dual_cone.py): for each row u of lower [B, K], the projection
 * argmin_{v ≥ u} vᵀGv, written to out [B, K], or their sum to out [K] when sum_rows. */
static int dual_cone_solve(const double *g, const double *lower, int b, int k, int sum_rows, double *out, Arena *ar) {
    double *a = take(ar, (size_t)k * k), *s = take(ar, k), *reg = take(ar, k), *bound = take(ar, k),
           *q = take(ar, k), *qs = take(ar, k), *z = take(ar, k), *b1 = take(ar, k), *b2 = take(ar, k);
    scale_gramian(g, k, QP_EPS, QP_EPS, a, s, reg);
    Nnqp solver;
    if (!nnqp_init(&solver, k, a)) {
        nnqp_free(&solver);
        return NOMEM;
    }
    int status = OK;
    if (sum_rows) memset(out, 0, sizeof(double) * (size_t)k);
    for (int p = 0; p < b && status == OK; p++) {
        const double *u = lower + (size_t)p * k;
        double spread = 0.0;
        for (int i = 0; i < k; i++) {
            bound[i] = u[i] / s[i];
            spread += fabs(bound[i]) * solver.unit[i];
        }
        for (int i = 0; i < k; i++) {
            double ab = 0.0;
            for (int j = 0; j < k; j++) ab += bound[j] * a[(size_t)j * k + i];
            q[i] = -ab + reg[i] * bound[i];
            qs[i] = solver.unit[i] * spread + fabs(q[i]);
        }
        if (!nnqp_refined(&solver, a, q, reg, qs, 3 * k + 30, QP_REFINE, z, b1, b2)) status = UNCONVERGED;
        double *row = sum_rows ? out : out + (size_t)p * k;
        for (int i = 0; i < k; i++) row[i] = sum_rows ? row[i] + (z[i] + bound[i]) * s[i] : (z[i] + bound[i]) * s[i];
    }
    nnqp_free(&solver);
    return status;
}

static double quad_form(const double *g, const double *x, int k) {
    double total = 0.0;
    for (int i = 0; i < k; i++) {
        double gx = 0.0;
        for (int j = 0; j < k; j++) gx += g[(size_t)i * k + j] * x[j];
        total += gx * x[i];
    }
    return total;
}

static double min_product(const double *g, const double *x, int k) {
    double low = INFINITY;
    for (int i = 0; i < k; i++) {
        double gx = 0.0;
        for (int j = 0; j < k; j++) gx += g[(size_t)i * k + j] * x[j];
        low = gx < low ? gx : low;
    }
    return low;
}

/* CAGrad's degenerate case (gradagg/_methods/cagrad.py, _cagrad): where Jᵀw* = 0, g0 projected onto
 * the dual cone replaces w when it lies in the ball and beats w on min_i g_i·d. */
static int cagrad_fallback(const double *g, int k, double cc, double *w, Arena *ar) {
    double *mean = take(ar, k), *wc = take(ar, k), *off = take(ar, k);
    for (int i = 0; i < k; i++) mean[i] = 1.0 / k;
    int status = dual_cone_solve(g, mean, 1, k, 0, wc, ar);
    if (status != OK) return status;
    double peak = -INFINITY;
    for (int i = 0; i < k; i++) {
        off[i] = wc[i] - mean[i];
        peak = g[(size_t)i * k + i] > peak ? g[(size_t)i * k + i] : peak;
    }
    double g0 = quad_form(g, mean, k);
    int in_ball = quad_form(g, off, k) <= cc * cc * g0 * (1.0 + 1e-9);
    double unit = peak * (g0 > 0.0 ? g0 : 0.0);
    int better = min_product(g, wc, k) > min_product(g, w, k) + 1e-9 * (1.0 + cc) * sqrt(unit);
    if (in_ball && better && cc > 0.0) memcpy(w, wc, sizeof(double) * (size_t)k);
    return OK;
}

/* FairGrad (gradagg/_methods/fairgrad.py): G w = w^(−β) in the unit-diagonal scaling. */
static int fairgrad_solve(const double *g, int k, double beta, int max_iter, double *w, Arena *ar) {
    double *a = take(ar, (size_t)k * k), *s = take(ar, k), *reg = take(ar, k), *c = take(ar, k),
           *start = take(ar, k), *u = take(ar, k), *work = take(ar, (size_t)k * k + 6 * (size_t)k);
    scale_gramian(g, k, BARRIER_EPS, 1.0, a, s, reg);
    for (int i = 0; i < k; i++) {
        c[i] = pow(s[i], 1.0 - beta);
        start[i] = pow(c[i], 1.0 / (1.0 + beta));
    }
    int ok = barrier_solve(a, c, start, k, beta, max_iter, u, work);
    for (int i = 0; i < k; i++) w[i] = g[(size_t)i * k + i] > 0.0 ? s[i] * u[i] : 0.0;
    return ok ? OK : UNCONVERGED;
}

/* Nash-MTL (gradagg/_methods/nash_mtl.py): α ⊙ (Gα) = 1, warm-started from ``previous``. */
static int nash_solve(const double *g, const double *previous, int k, int max_iter, double *alpha, Arena *ar) {
    double *a = take(ar, (size_t)k * k), *s = take(ar, k), *reg = take(ar, k), *c = take(ar, k),
           *start = take(ar, k), *u = take(ar, k), *work = take(ar, (size_t)k * k + 6 * (size_t)k);
    scale_gramian(g, k, BARRIER_EPS, 1.0, a, s, reg);
    int have = 1;
    for (int i = 0; i < k; i++) have &= previous[i] > 0.0;
    for (int i = 0; i < k; i++) {
        c[i] = 1.0;
        start[i] = (have && g[(size_t)i * k + i] > 0.0) ? previous[i] / s[i] : 1.0;
    }
    int ok = barrier_solve(a, c, start, k, 1.0, max_iter, u, work);
    for (int i = 0; i < k; i++) alpha[i] = g[(size_t)i * k + i] > 0.0 ? s[i] * u[i] : 0.0;
    return ok ? OK : UNCONVERGED;
}

/* Parses ``n`` leading address arguments, then runs a weighting with a fresh arena of 2K² + 40K
 * doubles. Non-finite G gives NaN in out [out_len]. */
typedef int (*Weighting)(void **ptr, PyObject *const *rest, int k, Arena *ar);

static PyObject *run_weighting(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t expected, int n_ptr, Weighting fn,
                               const char *name) {
    if (nargs != expected) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments", name, expected);
        return NULL;
    }
    void *ptr[4];
    for (int i = 0; i < n_ptr; i++) {
        ptr[i] = PyLong_AsVoidPtr(args[i]);
        if (PyErr_Occurred()) return NULL;
    }
    long k = PyLong_AsLong(args[n_ptr]), out_len = PyLong_AsLong(args[n_ptr + 1]);
    if (PyErr_Occurred()) return NULL;
    const double *g = ptr[0];
    double *out = ptr[n_ptr - 1];
    if (!all_finite(g, (Py_ssize_t)k * k)) {
        fill_nan(out, out_len);
        return PyLong_FromLong(NONFINITE);
    }
    Arena ar = {malloc(sizeof(double) * (2 * (size_t)k * (size_t)k + 40 * (size_t)k)), 0, 0};
    if (!ar.base) return PyLong_FromLong(NOMEM);
    int status = fn(ptr, args + n_ptr + 2, (int)k, &ar);
    if (status == -1) {  /* a Python error while reading the remaining arguments */
        free(ar.base);
        return NULL;
    }
    if (status != OK && status != FALLBACK) fill_nan(out, out_len);
    free(ar.base);
    return PyLong_FromLong(status);
}

static int w_mgda(void **ptr, PyObject *const *rest, int k, Arena *ar) { return mgda_solve(ptr[0], k, ptr[1], ar); }

static int w_dual_cone(void **ptr, PyObject *const *rest, int k, Arena *ar) {
    long b = PyLong_AsLong(rest[0]), sum_rows = PyLong_AsLong(rest[1]);
    if (PyErr_Occurred()) return -1;
    return dual_cone_solve(ptr[0], ptr[1], (int)b, k, (int)sum_rows, ptr[2], ar);
}

static int w_cagrad(void **ptr, PyObject *const *rest, int k, Arena *ar) {
    double cc = PyFloat_AsDouble(rest[0]), divisor = PyFloat_AsDouble(rest[2]);
    long max_outer = PyLong_AsLong(rest[1]);
    if (PyErr_Occurred()) return -1;
    double *w = ptr[1], *a = take(ar, (size_t)k * k), *buf = take(ar, 12 * (size_t)k + (size_t)k * k);
    Nnqp s;
    for (size_t i = 0; i < (size_t)k * k; i++) a[i] = 0.0;
    if (!nnqp_init(&s, k, a)) {
        nnqp_free(&s);
        return NOMEM;
    }
    int status = cagrad_solve(ptr[0], k, cc, (int)max_outer, w, &s, a, buf);
    nnqp_free(&s);
    if (status == OK) {
        ar->used = 0;
        status = cagrad_fallback(ptr[0], k, cc, w, ar);
        for (int i = 0; i < k; i++) w[i] /= divisor;
    }
    return status;
}

static int w_fairgrad(void **ptr, PyObject *const *rest, int k, Arena *ar) {
    double beta = PyFloat_AsDouble(rest[0]);
    long max_iter = PyLong_AsLong(rest[1]);
    if (PyErr_Occurred()) return -1;
    return fairgrad_solve(ptr[0], k, beta, (int)max_iter, ptr[1], ar);
}

static int w_nash(void **ptr, PyObject *const *rest, int k, Arena *ar) {
    long max_iter = PyLong_AsLong(rest[0]);
    if (PyErr_Occurred()) return -1;
    return nash_solve(ptr[0], ptr[1], k, (int)max_iter, ptr[2], ar);
}

/* mgda(g, w, k, k) */
static PyObject *py_mgda(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return run_weighting(args, nargs, 4, 2, w_mgda, "mgda");
}

/* dual_cone(g, lower, out, k, out_len, b, sum_rows) */
static PyObject *py_dual_cone(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return run_weighting(args, nargs, 7, 3, w_dual_cone, "dual_cone");
}

/* cagrad_weights(g, w, k, k, c, max_outer, divisor): the final weights, divided by divisor */
static PyObject *py_cagrad_weights(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return run_weighting(args, nargs, 7, 2, w_cagrad, "cagrad_weights");
}

/* fairgrad(g, w, k, k, beta, max_iter) */
static PyObject *py_fairgrad(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return run_weighting(args, nargs, 6, 2, w_fairgrad, "fairgrad");
}

/* nash(g, previous, alpha, k, k, max_iter) */
static PyObject *py_nash(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return run_weighting(args, nargs, 6, 3, w_nash, "nash");
}

/* prepare(raw, is_float32, k, out, shift, tiny) -> flags. out = ½(G + Gᵀ) in double from the
 * accumulated Gramian raw (float32 or float64); flags: 1 the diagonal shows overflow or underflow (a non-finite entry or one below tiny;
 * gradagg/_gramian.py, needs_rescale), 2 an entry is not finite, 4 (when shift ≥ 0) the
 * unit-diagonal scaling minus shift·I has no Cholesky factor, i.e. an eigenvalue of A = S G S lies
 * at or below the noise floor's cut (gradagg/solvers/spectral.py, well_above; zero rows, which are
 * exact, get a unit pivot). */
static PyObject *py_prepare(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "prepare takes 6 arguments");
        return NULL;
    }
    const void *raw = PyLong_AsVoidPtr(args[0]);
    if (PyErr_Occurred()) return NULL;
    long f32 = PyLong_AsLong(args[1]), k = PyLong_AsLong(args[2]);
    if (PyErr_Occurred()) return NULL;
    double *out = PyLong_AsVoidPtr(args[3]);
    if (PyErr_Occurred()) return NULL;
    double shift = PyFloat_AsDouble(args[4]), tiny = PyFloat_AsDouble(args[5]);
    if (PyErr_Occurred()) return NULL;
    size_t n = (size_t)k;
#define RAW(i, j) (f32 ? (double)((const float *)raw)[(i) * n + (j)] : ((const double *)raw)[(i) * n + (j)])
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < n; j++) out[i * n + j] = 0.5 * (RAW(i, j) + RAW(j, i));
    long flags = 0;
    for (size_t i = 0; i < n; i++) {
        double d = RAW(i, i);
        if (!isfinite(d) || d < tiny) flags |= 1;
    }
#undef RAW
    if (!all_finite(out, (Py_ssize_t)(n * n))) flags |= 2;
    if (shift >= 0.0 && !(flags & 2) && n > 0) {
        double *m = malloc(sizeof(double) * n * n), *s = malloc(sizeof(double) * n);
        if (!m || !s) {
            free(m);
            free(s);
            return PyErr_NoMemory();
        }
        for (size_t i = 0; i < n; i++) s[i] = out[i * n + i] > 0.0 ? 1.0 / sqrt(out[i * n + i]) : 1.0;
        for (size_t i = 0; i < n; i++)
            for (size_t j = 0; j < n; j++)
                m[i * n + j] = out[i * n + j] * s[i] * s[j] + (i == j ? (out[i * n + i] > 0.0 ? -shift : 1.0) : 0.0);
        if (cholesky(m, (int)n)) flags |= 4;
        free(m);
        free(s);
    }
    return PyLong_FromLong(flags);
}

/* ------------------------------------------------------------------------------------------------
 * PCGrad's coefficient matrix (gradagg/_methods/pcgrad.py): row i of C starts at e_i and, for each
 * task j in order[i], loses (C_i·G_j / G_jj) e_j when that dot product is negative.
 */
/* pcgrad(g, keys, c, w, k) -> status. Row i projects in the order of its keys (its own last),
 * as argsort of keys + 2I does in the torch version; c (may be 0) receives C, w (may be 0) 1ᵀC. */
static PyObject *py_pcgrad(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "pcgrad takes 5 arguments");
        return NULL;
    }
    void *ptr[4];
    for (int i = 0; i < 4; i++) {
        ptr[i] = PyLong_AsVoidPtr(args[i]);
        if (PyErr_Occurred()) return NULL;
    }
    long k = PyLong_AsLong(args[4]);
    if (PyErr_Occurred()) return NULL;
    const double *g = ptr[0], *keys = ptr[1];
    double *c_out = ptr[2], *w = ptr[3];
    double *ci = malloc(sizeof(double) * (size_t)k);
    long *order = malloc(sizeof(long) * (size_t)k);
    if (!ci || !order) {
        free(ci);
        free(order);
        return PyErr_NoMemory();
    }
    if (w) memset(w, 0, sizeof(double) * (size_t)k);
    for (long i = 0; i < k; i++) {
        const double *key = keys + i * k;
        /* insertion sort of the other tasks by key */
        long n = 0;
        for (long j = 0; j < k; j++) {
            if (j == i) continue;
            long p = n++;
            while (p > 0 && key[order[p - 1]] > key[j]) {
                order[p] = order[p - 1];
                p--;
            }
            order[p] = j;
        }
        for (long j = 0; j < k; j++) ci[j] = i == j ? 1.0 : 0.0;
        for (long t = 0; t < k - 1; t++) {
            long j = order[t];
            double gjj = g[j * k + j], dot = 0.0;
            for (long m = 0; m < k; m++) dot += ci[m] * g[m * k + j];
            if (dot < 0.0 && gjj > 0.0) ci[j] -= dot / gjj;
        }
        if (c_out) memcpy(c_out + i * k, ci, sizeof(double) * (size_t)k);
        if (w)
            for (long j = 0; j < k; j++) w[j] += ci[j];
    }
    free(ci);
    free(order);
    return PyLong_FromLong(OK);
}

/* coef = A⁺1 on the nonzero rows P of G, for A = SGS (s_i = 1/‖g_i‖, 0 for zero rows; coef is 0
 * off P), where A_PP is provably invertible above the noise floor's cut: A_PP has unit diagonal,
 * so λ_max ≤ |P|, and λ_min ≥ 1/‖A_PP⁻¹‖_F = *bound; when that bound exceeds both the cut and
 * 1e-10 |P|, no eigenvalue falls under the cut of solvers/spectral.py (max(cut, 1e-12 λ_max)) and
 * the Cholesky solve gives what the spectrum would. Otherwise FALLBACK: the caller uses the
 * spectrum. */
static int unit_pinv_ones(const double *g, int k, double cut, double *s, double *coef, double *bound, Arena *ar) {
    double *m = take(ar, (size_t)k * k), *col = take(ar, k), *x = take(ar, k);
    int *idx = (int *)take(ar, k);
    int n = 0;
    for (int i = 0; i < k; i++) {
        double d = g[(size_t)i * k + i];
        s[i] = d > 0.0 ? 1.0 / sqrt(d) : 0.0;
        if (d > 0.0) idx[n++] = i;
        coef[i] = 0.0;
    }
    *bound = INFINITY;
    if (n == 0) return OK;
    for (int r = 0; r < n; r++)
        for (int c = 0; c < n; c++) m[r * n + c] = g[(size_t)idx[r] * k + idx[c]] * s[idx[r]] * s[idx[c]];
    if (cholesky(m, n)) return FALLBACK;
    double frob = 0.0;
    for (int c = 0; c < n; c++) {
        for (int r = 0; r < n; r++) col[r] = r == c ? 1.0 : 0.0;
        cholesky_solve(m, n, col);
        for (int r = 0; r < n; r++) frob += col[r] * col[r];
    }
    *bound = 1.0 / sqrt(frob);
    if (!(*bound > 1e-10 * n && *bound > cut)) return FALLBACK;
    for (int r = 0; r < n; r++) x[r] = 1.0;
    cholesky_solve(m, n, x);
    for (int r = 0; r < n; r++) coef[idx[r]] = x[r];
    return OK;
}

/* solvers/spectral.py, perpendicular_tol: cut / λ_min within [1e-12, ½]. */
static double perpendicular_tol(double cut, double low) {
    double t = cut / low;
    return t < 1e-12 ? 1e-12 : (t > 0.5 ? 0.5 : t);
}

/* IMTL-G (gradagg/_methods/imtl_g.py) for invertible G: w = S A⁻¹1 / Σ S A⁻¹1, and 0 where the sum
 * vanishes within the floor. */
static int imtl_g_solve(const double *g, int k, double cut, double *w, Arena *ar) {
    double *s = take(ar, k), *coef = take(ar, k), bound;
    int status = unit_pinv_ones(g, k, cut, s, coef, &bound, ar);
    if (status != OK) return status;
    double total = 0.0, size = 0.0;
    for (int i = 0; i < k; i++) {
        w[i] = s[i] * coef[i];
        total += w[i];
        size += fabs(w[i]);
    }
    int ok = fabs(total) > perpendicular_tol(cut, bound) * size;
    for (int i = 0; i < k; i++) w[i] = ok ? w[i] / total : 0.0;
    return OK;
}

/* ConFIG (gradagg/_methods/config.py) for invertible A: v = S A⁻¹1, w = ((1ᵀG) v / vᵀGv) v. */
static int config_solve(const double *g, int k, double cut, double *w, Arena *ar) {
    double *s = take(ar, k), *coef = take(ar, k), bound;
    int status = unit_pinv_ones(g, k, cut, s, coef, &bound, ar);
    if (status != OK) return status;
    double along = 0.0;
    for (int i = 0; i < k; i++) w[i] = s[i] * coef[i];
    double norm_sq = quad_form(g, w, k);
    for (int j = 0; j < k; j++) {
        double column = 0.0;
        for (int i = 0; i < k; i++) column += g[(size_t)i * k + j];
        along += column * w[j];
    }
    int ok = norm_sq > 0.0;
    for (int i = 0; i < k; i++) w[i] = ok ? along / norm_sq * w[i] : 0.0;
    return OK;
}

/* Krum (gradagg/_methods/krum.py): row i scores the sum of its K − f − 2 smallest squared distances
 * ‖g_i − g_j‖² = max(G_ii + G_jj − 2G_ij, 0), j ≠ i; scores are rounded to 36 significant bits
 * (round half to even, as torch.round), and the m lowest (ties to the lower index) get 1/m. */
static int krum_solve(const double *g, int k, int f, int m, double *w, Arena *ar) {
    double *dist = take(ar, k), *score = take(ar, k);
    int *order = (int *)take(ar, k);
    int keep = k - f - 2;
    for (int i = 0; i < k; i++) {
        int n = 0;
        for (int j = 0; j < k; j++) {
            if (j == i) continue;
            double d = g[(size_t)i * k + i] + g[(size_t)j * k + j] - 2.0 * g[(size_t)i * k + j];
            d = d > 0.0 ? d : 0.0;
            int p = n++;
            while (p > 0 && dist[p - 1] > d) {
                dist[p] = dist[p - 1];
                p--;
            }
            dist[p] = d;
        }
        double total = 0.0;
        for (int p = 0; p < keep; p++) total += dist[p];
        int exponent;
        double mantissa = frexp(total, &exponent);
        score[i] = ldexp(nearbyint(mantissa * 0x1p36) * 0x1p-36, exponent);
    }
    for (int i = 0; i < k; i++) { /* stable insertion sort of the indices by score */
        int p = i;
        while (p > 0 && score[order[p - 1]] > score[i]) {
            order[p] = order[p - 1];
            p--;
        }
        order[p] = i;
    }
    for (int i = 0; i < k; i++) w[i] = 0.0;
    for (int p = 0; p < m; p++) w[order[p]] = 1.0 / m;
    return OK;
}

static int w_krum(void **ptr, PyObject *const *rest, int k, Arena *ar) {
    long f = PyLong_AsLong(rest[0]), m = PyLong_AsLong(rest[1]);
    if (PyErr_Occurred()) return -1;
    return krum_solve(ptr[0], k, (int)f, (int)m, ptr[1], ar);
}

/* krum(g, w, k, k, f, m) */
static PyObject *py_krum(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return run_weighting(args, nargs, 6, 2, w_krum, "krum");
}

/* Eigendecomposition of the symmetric positive definite n x n matrix a (destroyed) by cyclic Jacobi
 * rotations (Golub & Van Loan, Matrix Computations, 8.5), which reach the eigenvalues to high
 * relative accuracy (Demmel & Veselić 1992): lam gets the eigenvalues, v (row-major) the
 * eigenvectors as columns. Returns 0, or 1 if 60 sweeps did not bring every off-diagonal entry
 * below 1e-16 of the geometric mean of its two diagonal entries. */
static int jacobi_eigh(double *a, int n, double *lam, double *v) {
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) v[i * n + j] = i == j ? 1.0 : 0.0;
    for (int sweep = 0; sweep < 60; sweep++) {
        int rotated = 0;
        for (int p = 0; p < n; p++)
            for (int q = p + 1; q < n; q++) {
                double apq = a[p * n + q];
                if (apq == 0.0) continue;
                /* Negligible beside the diagonal, relative to the geometric mean of its two entries
                 * (Demmel & Veselić's criterion, which keeps small eigenvalues of graded matrices
                 * accurate; a sum of the two would let the larger hide the smaller): set to 0. */
                if (fabs(apq) <= 1e-16 * sqrt(fabs(a[p * n + p] * a[q * n + q]))) {
                    a[p * n + q] = a[q * n + p] = 0.0;
                    continue;
                }
                rotated = 1;
                double theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                double t = (theta >= 0.0 ? 1.0 : -1.0) / (fabs(theta) + sqrt(theta * theta + 1.0));
                double c = 1.0 / sqrt(t * t + 1.0), s = t * c;
                for (int k = 0; k < n; k++) { /* A ← A J (columns p, q) */
                    double akp = a[k * n + p], akq = a[k * n + q];
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for (int k = 0; k < n; k++) { /* A ← Jᵀ A (rows p, q) */
                    double apk = a[p * n + k], aqk = a[q * n + k];
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                a[p * n + q] = a[q * n + p] = 0.0;
                for (int k = 0; k < n; k++) {
                    double vkp = v[k * n + p], vkq = v[k * n + q];
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        if (!rotated) {
            for (int i = 0; i < n; i++) lam[i] = a[i * n + i];
            return 0;
        }
    }
    return 1;
}

/* Aligned-MTL (gradagg/_methods/aligned_mtl.py) where A = S G S is provably above the spectrum's cut
 * (a Cholesky factor of A − max(cut, 1e-12 K)·I exists; no zero rows): w = σ V Λ^(−1/2) Vᵀ p over every eigenvalue of G,
 * σ² the smallest (mode 0), median (1) or mean (2). Otherwise FALLBACK: the graded factor in torch. */
static int aligned_solve(const double *g, const double *pref, int k, int mode, double cut, double *w, Arena *ar) {
    double *a = take(ar, (size_t)k * k), *v = take(ar, (size_t)k * k), *lam = take(ar, k), *x = take(ar, k),
           *ordered = take(ar, k);
    double peak = 0.0;
    for (int i = 0; i < k; i++) {
        double d = g[(size_t)i * k + i];
        if (!(d > 0.0)) return FALLBACK;
        x[i] = 1.0 / sqrt(d);
        peak = d > peak ? d : peak;
    }
    /* λ_max(A) ≤ K: above max(cut, 1e-12 K) every eigenvalue passes the spectrum's cut too. */
    double shift = cut > 1e-12 * k ? cut : 1e-12 * k;
    for (int i = 0; i < k; i++)
        for (int j = 0; j < k; j++) a[(size_t)i * k + j] = g[(size_t)i * k + j] * x[i] * x[j] - (i == j ? shift : 0.0);
    if (cholesky(a, k)) return FALLBACK;
    for (size_t i = 0; i < (size_t)k * k; i++) a[i] = g[i] / peak;
    if (jacobi_eigh(a, k, lam, v)) return FALLBACK;
    double low = INFINITY, total = 0.0;
    for (int i = 0; i < k; i++) {
        if (!(lam[i] > 0.0)) return FALLBACK;
        ordered[i] = lam[i];
        total += lam[i];
        low = lam[i] < low ? lam[i] : low;
    }
    double sigma2;
    if (mode == 0) {
        sigma2 = low;
    } else if (mode == 2) {
        sigma2 = total / k;
    } else {
        for (int i = 1; i < k; i++) { /* ascending */
            double x0 = ordered[i];
            int p = i;
            while (p > 0 && ordered[p - 1] > x0) {
                ordered[p] = ordered[p - 1];
                p--;
            }
            ordered[p] = x0;
        }
        sigma2 = 0.5 * (ordered[(k - 1) / 2] + ordered[k / 2]);
    }
    double sigma = sqrt(sigma2);
    for (int j = 0; j < k; j++) { /* x = Λ^(−1/2) Vᵀ p */
        double vp = 0.0;
        for (int i = 0; i < k; i++) vp += v[(size_t)i * k + j] * pref[i];
        x[j] = vp / sqrt(lam[j]);
    }
    for (int i = 0; i < k; i++) {
        double wi = 0.0;
        for (int j = 0; j < k; j++) wi += v[(size_t)i * k + j] * x[j];
        w[i] = sigma * wi;
    }
    return OK;
}

static int w_aligned(void **ptr, PyObject *const *rest, int k, Arena *ar) {
    long mode = PyLong_AsLong(rest[0]);
    double cut = PyFloat_AsDouble(rest[1]);
    if (PyErr_Occurred()) return -1;
    return aligned_solve(ptr[0], ptr[1], k, (int)mode, cut, ptr[2], ar);
}

/* aligned_mtl(g, pref, w, k, k, mode, cut) -> status (4: use the torch path) */
static PyObject *py_aligned_mtl(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return run_weighting(args, nargs, 7, 3, w_aligned, "aligned_mtl");
}

static int w_config(void **ptr, PyObject *const *rest, int k, Arena *ar) {
    double cut = PyFloat_AsDouble(rest[0]);
    if (PyErr_Occurred()) return -1;
    return config_solve(ptr[0], k, cut, ptr[1], ar);
}

/* config(g, w, k, k, cut) -> status (4: use the torch path) */
static PyObject *py_config(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return run_weighting(args, nargs, 5, 2, w_config, "config");
}

static int w_imtl_g(void **ptr, PyObject *const *rest, int k, Arena *ar) {
    double cut = PyFloat_AsDouble(rest[0]);
    if (PyErr_Occurred()) return -1;
    return imtl_g_solve(ptr[0], k, cut, ptr[1], ar);
}

/* imtl_g(g, w, k, k, cut) -> status (4: use the torch path) */
static PyObject *py_imtl_g(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    return run_weighting(args, nargs, 5, 2, w_imtl_g, "imtl_g");
}

/* ------------------------------------------------------------------------------------------------
 * The per-coordinate methods over rows [K, n] of J (float32 or float64, any strides), in blocks of
 * columns so that every row is read once, in order (gradagg/_methods/elementwise.py).
 */
#define BLOCK 512

/* The uniform U of coordinate `index`: the top 24 bits of a 32-bit integer hash (Wellons'
 * "lowbias32", applied twice to mix in both halves of the seed) of the index. Counter-based, so
 * every coordinate's draw is fixed by (seed, index) alone, and 32-bit arithmetic, so the compiler
 * vectorises it. */
static inline uint32_t lowbias32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

static inline float uniform24(uint64_t seed, uint64_t index) {
    uint32_t bits = lowbias32(lowbias32((uint32_t)index + (uint32_t)seed) ^ (uint32_t)(seed >> 32));
    return (float)(int32_t)(bits >> 8) * 0x1p-24f;
}

/* On x86-64 Linux with GCC the kernels are also built for AVX2 and chosen at load time. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define KERNEL __attribute__((target_clones("avx2", "default")))
#else
#define KERNEL
#endif

/* Sums in the input precision T, as the torch version does; every select is branchless (the signs
 * of random data defeat branch prediction). COL(c) is the offset of column c in a row: c for
 * contiguous rows, so that the compiler vectorises the loops, c * s1 otherwise. */
#define GRADDROP_KERNEL(NAME, T, COL)                                                                     \
    KERNEL static void NAME(const T *r, long k, long n, long s0, long s1, const double *leak, uint64_t seed,\
                     uint64_t offset, T *out) {                                                           \
        T total[BLOCK], mag[BLOCK], absolute[BLOCK], signed_[BLOCK], leaked[BLOCK];                         \
        for (long c0 = 0; c0 < n; c0 += BLOCK) {                                                          \
            long nb = n - c0 < BLOCK ? n - c0 : BLOCK;                                                    \
            for (long c = 0; c < nb; c++) total[c] = mag[c] = absolute[c] = signed_[c] = leaked[c] = 0;    \
            for (long i = 0; i < k; i++) {                                                                \
                const T *row = r + i * s0 + c0 * s1;                                                      \
                if (leak) {                                                                               \
                    T li = (T)leak[i], mi = (T)(1.0 - leak[i]);                                           \
                    for (long c = 0; c < nb; c++) {                                                       \
                        T x = row[COL(c)], ax = x < 0 ? -x : x;                                           \
                        total[c] += x;                                                                    \
                        mag[c] += ax;                                                                     \
                        absolute[c] += mi * ax;                                                           \
                        signed_[c] += mi * x;                                                             \
                        leaked[c] += li * x;                                                              \
                    }                                                                                     \
                } else {                                                                                  \
                    for (long c = 0; c < nb; c++) {                                                       \
                        T x = row[COL(c)];                                                                \
                        total[c] += x;                                                                    \
                        mag[c] += x < 0 ? -x : x;                                                         \
                    }                                                                                     \
                }                                                                                         \
            }                                                                                             \
            if (!leak)                                                                                    \
                for (long c = 0; c < nb; c++) {                                                           \
                    absolute[c] = mag[c];                                                                 \
                    signed_[c] = total[c];                                                                \
                }                                                                                         \
            for (long c = 0; c < nb; c++) {                                                               \
                T m = mag[c], nonzero = (T)(m > 0);                                                       \
                T p = (T)0.5 * (1 + nonzero * total[c] / (m + (1 - nonzero)));                            \
                T u = (T)uniform24(seed, offset + (uint64_t)(c0 + c));                                    \
                T gt = (T)(p > u), lt = (T)(p < u);                                                       \
                out[c0 + c] = leaked[c] + gt * (T)0.5 * (signed_[c] + absolute[c]) +                      \
                              lt * (T)0.5 * (signed_[c] - absolute[c]);                                   \
            }                                                                                             \
        }                                                                                                 \
    }
#define CONTIGUOUS(c) (c)
#define STRIDED(c) ((c) * s1)
GRADDROP_KERNEL(graddrop_f32, float, CONTIGUOUS)
GRADDROP_KERNEL(graddrop_f64, double, CONTIGUOUS)
GRADDROP_KERNEL(graddrop_f32_strided, float, STRIDED)
GRADDROP_KERNEL(graddrop_f64_strided, double, STRIDED)

/* Rows [K, n] of J as the per-coordinate entry points receive them: (address, is_float32, K, n,
 * stride0, stride1) in args[0..5], then the function's own arguments, the output address last. */
typedef struct {
    const void *data;
    long f32, k, n, s0, s1;
    void *out;
} Rows;

static int parse_rows(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t expected, const char *name, Rows *r) {
    if (nargs != expected) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments", name, expected);
        return 0;
    }
    r->data = PyLong_AsVoidPtr(args[0]);
    r->f32 = PyLong_AsLong(args[1]);
    r->k = PyLong_AsLong(args[2]);
    r->n = PyLong_AsLong(args[3]);
    r->s0 = PyLong_AsLong(args[4]);
    r->s1 = PyLong_AsLong(args[5]);
    r->out = PyLong_AsVoidPtr(args[expected - 1]);
    return !PyErr_Occurred();
}

/* graddrop(rows, is_float32, k, n, stride0, stride1, leak (0: none), seed (address of an int64),
 * offset, out) */
static PyObject *py_graddrop(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Rows r;
    if (!parse_rows(args, nargs, 10, "graddrop", &r)) return NULL;
    const double *leak = PyLong_AsVoidPtr(args[6]);
    const int64_t *seed_at = PyLong_AsVoidPtr(args[7]);
    uint64_t offset = PyLong_AsUnsignedLongLongMask(args[8]);
    if (PyErr_Occurred()) return NULL;
    uint64_t seed = (uint64_t)*seed_at;
    Py_BEGIN_ALLOW_THREADS
    if (r.f32)
        (r.s1 == 1 ? graddrop_f32 : graddrop_f32_strided)(r.data, r.k, r.n, r.s0, r.s1, leak, seed, offset, r.out);
    else
        (r.s1 == 1 ? graddrop_f64 : graddrop_f64_strided)(r.data, r.k, r.n, r.s0, r.s1, leak, seed, offset, r.out);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(OK);
}

/* Per column: (Σ − the t largest − the t smallest) / (K − 2t). For t = 1 the extremes are a
 * branchless running max and min; larger t keep the extremes in sorted slots. A NaN or ±Inf makes
 * the sum, hence the result, non-finite. */
/* The trimmed mean as the sum of the middle values themselves: each value goes through the network of
 * the t largest seen so far, the value that network evicts through the network of the t smallest,
 * and what that one evicts is a middle value. (Subtracting the extremes from the total instead would
 * lose the middle values to cancellation beside large extremes.) The plain total is carried along
 * only so that NaN or ±Inf anywhere in a column makes the result non-finite. */
#define TRIMMED_KERNEL(NAME, T, COL)                                                                      \
    KERNEL static void NAME(const T *r, long k, long n, long s0, long s1, long t, T *work, T *out) {     \
        T *sum = work, *top = sum + BLOCK, *bot = top + (size_t)BLOCK * (t > 0 ? t : 1),                  \
          *mid = bot + (size_t)BLOCK * (t > 0 ? t : 1);                                                   \
        for (long c0 = 0; c0 < n; c0 += BLOCK) {                                                          \
            long nb = n - c0 < BLOCK ? n - c0 : BLOCK;                                                    \
            if (t == 1) {                                                                                 \
                const T *first = r + c0 * s1, *second = r + s0 + c0 * s1;                                 \
                for (long c = 0; c < nb; c++) {                                                           \
                    T a = first[COL(c)], b = second[COL(c)];                                              \
                    sum[c] = a + b;                                                                       \
                    top[c] = a > b ? a : b;                                                               \
                    bot[c] = a > b ? b : a;                                                               \
                    mid[c] = 0;                                                                           \
                }                                                                                         \
                for (long i = 2; i < k; i++) {                                                            \
                    const T *row = r + i * s0 + c0 * s1;                                                  \
                    for (long c = 0; c < nb; c++) {                                                       \
                        T x = row[COL(c)];                                                                \
                        sum[c] += x;                                                                      \
                        T out_of_top = x < top[c] ? x : top[c];                                           \
                        top[c] = x < top[c] ? top[c] : x;                                                 \
                        T out_of_bot = out_of_top > bot[c] ? out_of_top : bot[c];                         \
                        bot[c] = out_of_top > bot[c] ? bot[c] : out_of_top;                               \
                        mid[c] += out_of_bot;                                                             \
                    }                                                                                     \
                }                                                                                         \
                for (long c = 0; c < nb; c++) out[c0 + c] = mid[c] / (T)(k - 2) + (T)0 * sum[c];          \
                continue;                                                                                 \
            }                                                                                             \
            for (long c = 0; c < nb; c++) {                                                               \
                T *hi = top + c * t, *lo = bot + c * t, total = 0, kept = 0;                              \
                long nhi = 0, nlo = 0;                                                                    \
                for (long i = 0; i < k; i++) {                                                            \
                    T x = r[i * s0 + (c0 + c) * s1];                                                      \
                    total += x;                                                                           \
                    /* hi: descending; insert x, and x becomes what falls out (or nothing yet) */         \
                    int full = nhi == t;                                                                  \
                    long p = full ? t - 1 : nhi++;                                                        \
                    if (full && !(x > hi[t - 1])) {                                                       \
                        /* x itself falls out of the top */                                               \
                    } else {                                                                              \
                        T evicted = full ? hi[t - 1] : 0;                                                 \
                        for (; p > 0 && hi[p - 1] < x; p--) hi[p] = hi[p - 1];                            \
                        hi[p] = x;                                                                        \
                        if (!full) continue;                                                              \
                        x = evicted;                                                                      \
                    }                                                                                     \
                    /* lo: ascending; the same with what fell out of the top */                           \
                    full = nlo == t;                                                                      \
                    p = full ? t - 1 : nlo++;                                                             \
                    if (full && !(x < lo[t - 1])) {                                                       \
                        kept += x;                                                                        \
                        continue;                                                                         \
                    }                                                                                     \
                    T evicted = full ? lo[t - 1] : 0;                                                     \
                    for (; p > 0 && lo[p - 1] > x; p--) lo[p] = lo[p - 1];                                \
                    lo[p] = x;                                                                            \
                    if (full) kept += evicted;                                                            \
                }                                                                                         \
                out[c0 + c] = kept / (T)(k - 2 * t) + (T)0 * total;                                       \
            }                                                                                             \
        }                                                                                                 \
    }
TRIMMED_KERNEL(trimmed_f32, float, CONTIGUOUS)
TRIMMED_KERNEL(trimmed_f64, double, CONTIGUOUS)
TRIMMED_KERNEL(trimmed_f32_strided, float, STRIDED)
TRIMMED_KERNEL(trimmed_f64_strided, double, STRIDED)

/* trimmed_mean(rows, is_float32, k, n, stride0, stride1, trim, out) */
static PyObject *py_trimmed_mean(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Rows r;
    if (!parse_rows(args, nargs, 8, "trimmed_mean", &r)) return NULL;
    long t = PyLong_AsLong(args[6]);
    if (PyErr_Occurred()) return NULL;
    double *work = malloc(sizeof(double) * (size_t)BLOCK * (2 + 2 * (size_t)(t > 0 ? t : 1)));
    if (!work) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    if (r.f32)
        (r.s1 == 1 ? trimmed_f32 : trimmed_f32_strided)(r.data, r.k, r.n, r.s0, r.s1, t, (float *)work, r.out);
    else
        (r.s1 == 1 ? trimmed_f64 : trimmed_f64_strided)(r.data, r.k, r.n, r.s0, r.s1, t, work, r.out);
    Py_END_ALLOW_THREADS
    free(work);
    return PyLong_FromLong(OK);
}

/* d = wᵀJ over rows [K, n] in the input precision T (as torch's w.to(T) @ rows), and whether the sum
 * of d is finite: the output check of gradagg/_api.py at no extra pass. For small n, where one
 * BLAS call plus one reduction cost more in dispatch than the arithmetic. */
#define COMBINE_KERNEL(NAME, T, COL)                                                                      \
    KERNEL static int NAME(const double *w, const T *r, long k, long n, long s0, long s1, T *out) {      \
        T partial[8] = {0, 0, 0, 0, 0, 0, 0, 0}; /* independent sums: no serial chain of additions */  \
        for (long c0 = 0; c0 < n; c0 += BLOCK) {                                                          \
            long nb = n - c0 < BLOCK ? n - c0 : BLOCK;                                                    \
            T *acc = out + c0;                                                                            \
            const T *first = r + c0 * s1;                                                                 \
            T w0 = (T)w[0];                                                                               \
            for (long c = 0; c < nb; c++) acc[c] = w0 * first[COL(c)];                                    \
            for (long i = 1; i < k; i++) {                                                                \
                const T *row = r + i * s0 + c0 * s1;                                                      \
                T wi = (T)w[i];                                                                           \
                for (long c = 0; c < nb; c++) acc[c] += wi * row[COL(c)];                                 \
            }                                                                                             \
            long c = 0;                                                                                   \
            for (; c + 8 <= nb; c += 8)                                                                   \
                for (int l = 0; l < 8; l++) partial[l] += acc[c + l];                                     \
            for (; c < nb; c++) partial[0] += acc[c];                                                     \
        }                                                                                                 \
        T total = 0;                                                                                      \
        for (int l = 0; l < 8; l++) total += partial[l];                                                  \
        return isfinite(total);                                                                           \
    }
COMBINE_KERNEL(combine_f32, float, CONTIGUOUS)
COMBINE_KERNEL(combine_f64, double, CONTIGUOUS)
COMBINE_KERNEL(combine_f32_strided, float, STRIDED)
COMBINE_KERNEL(combine_f64_strided, double, STRIDED)

/* combine(rows, is_float32, k, n, stride0, stride1, w (float64 [K]), out) -> whether Σ d is finite */
static PyObject *py_combine(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Rows r;
    if (!parse_rows(args, nargs, 8, "combine", &r)) return NULL;
    const double *w = PyLong_AsVoidPtr(args[6]);
    if (PyErr_Occurred()) return NULL;
    int finite;
    if (r.f32)
        finite = (r.s1 == 1 ? combine_f32 : combine_f32_strided)(w, r.data, r.k, r.n, r.s0, r.s1, r.out);
    else
        finite = (r.s1 == 1 ? combine_f64 : combine_f64_strided)(w, r.data, r.k, r.n, r.s0, r.s1, r.out);
    return PyBool_FromLong(finite);
}

static PyMethodDef methods[] = {
    {"pcgrad", (PyCFunction)(void (*)(void))py_pcgrad, METH_FASTCALL, "PCGrad's coefficient matrix."},
    {"imtl_g", (PyCFunction)(void (*)(void))py_imtl_g, METH_FASTCALL, "IMTL-G's weights from G."},
    {"config", (PyCFunction)(void (*)(void))py_config, METH_FASTCALL, "ConFIG's weights from G."},
    {"aligned_mtl", (PyCFunction)(void (*)(void))py_aligned_mtl, METH_FASTCALL, "Aligned-MTL's weights from G."},
    {"krum", (PyCFunction)(void (*)(void))py_krum, METH_FASTCALL, "Krum's weights from G."},
    {"combine", (PyCFunction)(void (*)(void))py_combine, METH_FASTCALL, "d = wᵀJ and a finiteness flag."},
    {"graddrop", (PyCFunction)(void (*)(void))py_graddrop, METH_FASTCALL, "GradDrop over rows of J."},
    {"trimmed_mean", (PyCFunction)(void (*)(void))py_trimmed_mean, METH_FASTCALL, "Trimmed mean over rows of J."},
    {"mgda", (PyCFunction)(void (*)(void))py_mgda, METH_FASTCALL, "MGDA's weights from G."},
    {"dual_cone", (PyCFunction)(void (*)(void))py_dual_cone, METH_FASTCALL, "Dual-cone projections (UPGrad)."},
    {"cagrad_weights", (PyCFunction)(void (*)(void))py_cagrad_weights, METH_FASTCALL, "CAGrad's weights from G."},
    {"fairgrad", (PyCFunction)(void (*)(void))py_fairgrad, METH_FASTCALL, "FairGrad's weights from G."},
    {"nash", (PyCFunction)(void (*)(void))py_nash, METH_FASTCALL, "Nash-MTL's weights from G."},
    {"prepare", (PyCFunction)(void (*)(void))py_prepare, METH_FASTCALL, "Symmetrised float64 Gramian and flags."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kkt", "gradagg's K x K solvers in C.", -1, methods, NULL, NULL, NULL, NULL,
};

/* The constants shared with the torch implementations, exposed so that a test keeps them equal. */
PyMODINIT_FUNC PyInit__kkt(void) {
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddObject(m, "SIGN_TOL", PyFloat_FromDouble(SIGN_TOL)) < 0 ||
        PyModule_AddObject(m, "QP_EPS", PyFloat_FromDouble(QP_EPS)) < 0 ||
        PyModule_AddObject(m, "QP_REFINE", PyLong_FromLong(QP_REFINE)) < 0 ||
        PyModule_AddObject(m, "CAGRAD_EPS", PyFloat_FromDouble(CAGRAD_EPS)) < 0 ||
        PyModule_AddObject(m, "BARRIER_EPS", PyFloat_FromDouble(BARRIER_EPS)) < 0 ||
        PyModule_AddObject(m, "RESIDUAL_TOL", PyFloat_FromDouble(RESIDUAL_TOL)) < 0 ||
        PyModule_AddObject(m, "CONVERGED_TOL", PyFloat_FromDouble(CONVERGED_TOL)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
