//! Training, pure: labelled samples of one hardware class in, a validated [`EnergyModel`] out.
//!
//! Per P-state and per target (perf, power, throughput ratio) one linear fit with smartcore:
//! ordinary least squares as in the report, or ridge or lasso. Features are standardised before
//! fitting and the coefficients folded back to raw units, so the model predicts from raw features.
//! k-fold cross-validation gives R², MAE and MAPE per fit. Ordinary least squares factorises
//! each design once for the three targets (smartcore's multi-target fit). The folds and P-states
//! are independent, so they are fitted on every core from one queue; their results are put
//! together in order, so the model is the same whatever the cores did.
//!
//! smartcore 0.7 fails quietly on bad data (measured here: QR returns coefficients of ±3e11 on a
//! constant or duplicated column, SVD panics on a NaN, ridge without normalisation fits no
//! intercept), so every fit is preceded by screening: non-finite values are refused with the
//! sample named, constant columns are dropped (coefficient 0, listed in the model), columns
//! collinear with an earlier one are dropped too, and a fit that panics becomes an error instead
//! of taking the coordinator down.

use std::panic::{AssertUnwindSafe, catch_unwind};

use rand::{SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;
use smartcore::{
    linalg::basic::{arrays::Array, matrix::DenseMatrix},
    linear::{
        lasso::{Lasso, LassoParameters},
        linear_regression::{
            LinearRegression, LinearRegressionParameters, LinearRegressionSolverName,
        },
        ridge_regression::{RidgeRegression, RidgeRegressionParameters, RidgeRegressionSolverName},
    },
};
use thiserror::Error;
use vmgov_proto::{
    Algorithm, EnergyModel, Feature, LinearFit, ModelError, PStateModel, PStateTable, Ratios,
    RawCounters, Target, features,
    model::{FitQuality, TrainingInfo},
};

/// One labelled timeslice of one VM, as learning mode produces it.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledSample {
    /// The P-state the slice ran at.
    pub pstate: usize,
    /// The slice's raw counters.
    pub counters: RawCounters,
    /// Its measured ratios against f_max.
    pub labels: Ratios,
}

/// What to train.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainRequest {
    /// Hardware class.
    pub hardware_class: String,
    /// Version the model gets.
    pub version: u64,
    /// The class's P-states.
    pub pstates: PStateTable,
    /// Features, in order.
    pub features: Vec<Feature>,
    /// Regression method.
    pub algorithm: Algorithm,
    /// Penalty for ridge and lasso (in standardised units).
    pub alpha: f64,
    /// Cross-validation folds (at least 2).
    pub folds: u32,
    /// Creation time, Unix ms.
    pub created_unix_ms: u64,
    /// Free text on the data.
    pub notes: String,
}

/// Fewest samples a P-state needs, whatever the folds.
pub const MIN_SAMPLES_PER_PSTATE: usize = 20;

/// Why a model could not be trained.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum TrainError {
    /// A P-state has no samples at all.
    #[error("P-state {pstate} ({ghz:.2} GHz) has no samples; learning must sweep every P-state")]
    NoSamples {
        /// The P-state.
        pstate: usize,
        /// Its frequency.
        ghz: f64,
    },
    /// A P-state has too few samples.
    #[error("P-state {pstate} has {have} samples; at least {need} are needed")]
    TooFewSamples {
        /// The P-state.
        pstate: usize,
        /// Samples present.
        have: usize,
        /// Samples needed.
        need: usize,
    },
    /// A sample names a P-state the class does not have.
    #[error(
        "sample {sample} ran at P-state {pstate}, which the class's table of {len} does not have"
    )]
    UnknownPState {
        /// Index of the sample.
        sample: usize,
        /// Its P-state.
        pstate: usize,
        /// P-states in the table.
        len: usize,
    },
    /// A sample's counters or labels are unusable.
    #[error("sample {sample}: {problem}")]
    BadSample {
        /// Index of the sample.
        sample: usize,
        /// What is wrong.
        problem: String,
    },
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The solver failed (or panicked) on a fit.
    #[error("fitting {target} at P-state {pstate} failed: {reason}")]
    Fit {
        /// The P-state.
        pstate: usize,
        /// The target.
        target: Target,
        /// The solver's reason.
        reason: String,
    },
    /// The trained model did not validate.
    #[error("the trained model is invalid")]
    Model(#[from] ModelError),
}

/// A design matrix in row-major order.
#[derive(Debug, Clone, Default)]
struct Rows {
    x: Vec<f64>,
    k: usize,
    y: [Vec<f64>; 3],
}

impl Rows {
    fn len(&self) -> usize {
        self.y[0].len()
    }
}

/// Which columns survive screening, and how to standardise them.
#[derive(Debug, Clone)]
struct Screen {
    keep: Vec<usize>,
    mean: Vec<f64>,
    std: Vec<f64>,
}

/// Keeps columns that vary and are not collinear with an earlier kept column.
fn screen(x: &[f64], k: usize, rows: &[usize]) -> Screen {
    #[allow(clippy::cast_precision_loss, reason = "row counts are far below 2^53")]
    let n = rows.len().max(1) as f64;
    let col = |j: usize| rows.iter().map(move |&r| x[r * k + j]);
    let mean: Vec<f64> = (0..k).map(|j| col(j).sum::<f64>() / n).collect();
    let std: Vec<f64> =
        (0..k).map(|j| (col(j).map(|v| (v - mean[j]).powi(2)).sum::<f64>() / n).sqrt()).collect();
    let mut keep: Vec<usize> = Vec::new();
    for j in 0..k {
        if std[j] <= 1e-12 * mean[j].abs().max(1e-300) || std[j] == 0.0 {
            continue;
        }
        let collinear = keep.iter().any(|&i| {
            let cov =
                col(i).zip(col(j)).map(|(a, b)| (a - mean[i]) * (b - mean[j])).sum::<f64>() / n;
            (cov / (std[i] * std[j])).abs() > 1.0 - 1e-9
        });
        if !collinear {
            keep.push(j);
        }
    }
    Screen { keep, mean, std }
}

/// Some rows of one P-state, screened and standardised once for the three targets.
struct Design<'a> {
    data: &'a Rows,
    rows: Vec<usize>,
    screen: Screen,
    /// The standardised kept columns; `None` when too few rows for them (an error only if a
    /// target varies).
    matrix: Option<DenseMatrix<f64>>,
}

impl<'a> Design<'a> {
    fn new(data: &'a Rows, rows: Vec<usize>) -> Result<Self, String> {
        let screen = screen(&data.x, data.k, &rows);
        let p = screen.keep.len();
        let matrix = if p > 0 && rows.len() > p + 1 {
            let mut z = Vec::with_capacity(rows.len() * p);
            for &r in &rows {
                for &j in &screen.keep {
                    z.push((data.x[r * data.k + j] - screen.mean[j]) / screen.std[j]);
                }
            }
            Some(DenseMatrix::new(rows.len(), p, z, false).map_err(|e| e.to_string())?)
        } else {
            None
        };
        Ok(Self { data, rows, screen, matrix })
    }

    /// Fits the three targets on the design; returns the fits in raw units. Ordinary least
    /// squares factorises the design once for every target that varies (smartcore's
    /// multi-target fit); ridge and lasso fit each target on its own.
    fn fit_all(&self, algorithm: Algorithm, alpha: f64) -> [Result<LinearFit, String>; 3] {
        let (data, s) = (self.data, &self.screen);
        let ys: [Vec<f64>; 3] =
            std::array::from_fn(|t| self.rows.iter().map(|&r| data.y[t][r]).collect());
        #[allow(clippy::cast_precision_loss, reason = "row counts are far below 2^53")]
        let means: [f64; 3] =
            std::array::from_fn(|t| ys[t].iter().sum::<f64>() / ys[t].len().max(1) as f64);
        let mut out: [Option<Result<LinearFit, String>>; 3] = [None, None, None];
        let mut varying = Vec::with_capacity(3);
        for t in 0..3 {
            if s.keep.is_empty() || ys[t].iter().all(|v| (v - means[t]).abs() < 1e-15) {
                // Nothing varies, or the target does not: the best fit is its mean.
                out[t] =
                    Some(Ok(LinearFit { intercept: means[t], coefficients: vec![0.0; data.k] }));
            } else {
                varying.push(t);
            }
        }
        let p = s.keep.len();
        let Some(m) = &self.matrix else {
            for t in varying {
                out[t] = Some(Err(format!("{} rows for {p} features", self.rows.len())));
            }
            return out.map(|o| o.unwrap_or_else(|| Err("internal: no fit".into())));
        };
        // Centre y for the solvers that fit no intercept; add the mean back below.
        let centred = |t: usize| ys[t].iter().map(|v| v - means[t]).collect::<Vec<f64>>();
        let solved: Vec<(usize, Solved)> = match algorithm {
            Algorithm::Ols if !varying.is_empty() => {
                let n = self.rows.len();
                let mut yc = Vec::with_capacity(n * varying.len());
                let columns: Vec<Vec<f64>> = varying.iter().map(|&t| centred(t)).collect();
                for r in 0..n {
                    yc.extend(columns.iter().map(|c| c[r]));
                }
                let fitted = catch_unwind(AssertUnwindSafe(|| -> Result<Vec<Solution>, String> {
                    let ym =
                        DenseMatrix::new(n, varying.len(), yc, false).map_err(|e| e.to_string())?;
                    let params = LinearRegressionParameters::default()
                        .with_solver(LinearRegressionSolverName::QR);
                    let f = LinearRegression::<f64, f64, DenseMatrix<f64>, Vec<f64>>::fit_matrix(
                        m, &ym, params,
                    )
                    .map_err(|e| e.to_string())?;
                    let (w, b) = (f.coefficients(), f.intercept_matrix());
                    Ok((0..varying.len())
                        .map(|c| ((0..p).map(|i| *w.get((i, c))).collect(), *b.get((0, c))))
                        .collect())
                }))
                .map_err(|_| "the solver panicked".to_owned())
                .and_then(|r| r);
                match fitted {
                    Ok(each) => varying.iter().copied().zip(each.into_iter().map(Ok)).collect(),
                    Err(e) => varying.iter().map(|&t| (t, Err(e.clone()))).collect(),
                }
            }
            _ => varying
                .iter()
                .map(|&t| (t, solve_one(m, &centred(t), algorithm, alpha, p)))
                .collect(),
        };
        for (t, result) in solved {
            out[t] = Some(result.and_then(|(beta, b0)| {
                if beta.iter().chain(std::iter::once(&b0)).any(|v| !v.is_finite()) {
                    return Err("the solver returned a non-finite coefficient".into());
                }
                // Back to raw units: y = y_mean + b0 + Σ β_j (x_j − μ_j)/σ_j.
                let mut coefficients = vec![0.0; data.k];
                let mut intercept = means[t] + b0;
                for (&j, b) in s.keep.iter().zip(&beta) {
                    coefficients[j] = b / s.std[j];
                    intercept -= b * s.mean[j] / s.std[j];
                }
                Ok(LinearFit { intercept, coefficients })
            }));
        }
        out.map(|o| o.unwrap_or_else(|| Err("internal: no fit".into())))
    }
}

/// Standardised coefficients and intercept of one target.
type Solution = (Vec<f64>, f64);

/// A target's solution, or why there is none.
type Solved = Result<Solution, String>;

/// Fits one centred target `yc` on the standardised design `m` of `p` columns; a solver panic
/// is an error, not a crash.
fn solve_one(
    m: &DenseMatrix<f64>,
    yc: &Vec<f64>,
    algorithm: Algorithm,
    alpha: f64,
    p: usize,
) -> Solved {
    let first = |w: &DenseMatrix<f64>| (0..p).map(|i| *w.get((i, 0))).collect::<Vec<f64>>();
    catch_unwind(AssertUnwindSafe(|| -> Solved {
        match algorithm {
            Algorithm::Ols => {
                let params = LinearRegressionParameters::default()
                    .with_solver(LinearRegressionSolverName::QR);
                let f = LinearRegression::fit(m, yc, params).map_err(|e| e.to_string())?;
                Ok((first(f.coefficients()), *f.intercept()))
            }
            Algorithm::Ridge => {
                let params = RidgeRegressionParameters::default()
                    .with_alpha(alpha)
                    .with_normalize(false)
                    .with_solver(RidgeRegressionSolverName::Cholesky);
                let f = RidgeRegression::fit(m, yc, params).map_err(|e| e.to_string())?;
                Ok((first(f.coefficients()), *f.intercept()))
            }
            Algorithm::Lasso => {
                let params = LassoParameters::default()
                    .with_alpha(alpha)
                    .with_normalize(false)
                    .with_fit_intercept(true)
                    .with_tol(1e-6)
                    .with_max_iter(10_000);
                let f = Lasso::fit(m, yc, params).map_err(|e| e.to_string())?;
                Ok((first(f.coefficients()), *f.intercept()))
            }
        }
    }))
    .map_err(|_| "the solver panicked".to_owned())
    .and_then(|r| r)
}

fn predict(f: &LinearFit, x: &[f64]) -> f64 {
    f.intercept + f.coefficients.iter().zip(x).map(|(a, b)| a * b).sum::<f64>()
}

/// R², MAE and MAPE of predictions against truth.
fn quality(truth: &[f64], predicted: &[f64]) -> (f64, f64, f64) {
    #[allow(clippy::cast_precision_loss, reason = "row counts are far below 2^53")]
    let n = truth.len().max(1) as f64;
    let mean = truth.iter().sum::<f64>() / n;
    let ss_tot: f64 = truth.iter().map(|y| (y - mean).powi(2)).sum();
    let ss_res: f64 = truth.iter().zip(predicted).map(|(y, p)| (y - p).powi(2)).sum();
    let r2 = if ss_tot > 1e-18 {
        1.0 - ss_res / ss_tot
    } else if ss_res < 1e-12 {
        1.0
    } else {
        0.0
    };
    let mae = truth.iter().zip(predicted).map(|(y, p)| (y - p).abs()).sum::<f64>() / n;
    // Ratios near zero (a server that served nothing) would blow MAPE up: skip them.
    let (sum, count) = truth
        .iter()
        .zip(predicted)
        .filter(|(y, _)| y.abs() > 1e-3)
        .fold((0.0, 0u32), |(s, c), (y, p)| (s + ((y - p) / y).abs(), c + 1));
    let mape = if count > 0 { sum / f64::from(count) } else { 0.0 };
    (r2, mae, mape)
}

/// One unit of training work: a cross-validation fold of a P-state, or its fit on all rows.
#[derive(Debug, Clone, Copy)]
enum Task {
    /// Fit on every fold but `fold`, predict `fold`'s rows.
    Fold { pstate: usize, fold: usize },
    /// Fit on every row: the model.
    All { pstate: usize },
}

/// What a task gave.
enum Done {
    /// Per target, the held-out rows' truth and predictions, in the fold's order.
    Fold { truth: [Vec<f64>; 3], predicted: [Vec<f64>; 3] },
    /// The three fits and the columns that survived screening.
    All { fits: [LinearFit; 3], kept: Vec<usize> },
}

fn run_task(
    req: &TrainRequest,
    data: &[Rows],
    orders: &[Vec<usize>],
    task: Task,
) -> Result<Done, TrainError> {
    let pstate = match task {
        Task::Fold { pstate, .. } | Task::All { pstate } => pstate,
    };
    let err = |target: usize| {
        move |reason| TrainError::Fit { pstate, target: Target::ALL[target], reason }
    };
    let rows = &data[pstate];
    let k = rows.k;
    match task {
        Task::Fold { fold, .. } => {
            // Each fold is screened and standardised on its training rows only, once for the
            // three targets.
            let folds = req.folds as usize;
            let order = &orders[pstate];
            let in_fold = |(i, _): &(usize, &usize)| i % folds == fold;
            let test: Vec<usize> =
                order.iter().enumerate().filter(in_fold).map(|(_, r)| *r).collect();
            let train: Vec<usize> =
                order.iter().enumerate().filter(|x| !in_fold(x)).map(|(_, r)| *r).collect();
            let design = Design::new(rows, train).map_err(err(0))?;
            let mut truth: [Vec<f64>; 3] = Default::default();
            let mut predicted: [Vec<f64>; 3] = Default::default();
            for (t, model) in design.fit_all(req.algorithm, req.alpha).into_iter().enumerate() {
                let model = model.map_err(err(t))?;
                for &r in &test {
                    truth[t].push(rows.y[t][r]);
                    predicted[t].push(predict(&model, &rows.x[r * k..(r + 1) * k]));
                }
            }
            Ok(Done::Fold { truth, predicted })
        }
        Task::All { .. } => {
            let design = Design::new(rows, (0..rows.len()).collect()).map_err(err(0))?;
            let [perf, power, throughput] = design.fit_all(req.algorithm, req.alpha);
            Ok(Done::All {
                fits: [perf.map_err(err(0))?, power.map_err(err(1))?, throughput.map_err(err(2))?],
                kept: design.screen.keep.clone(),
            })
        }
    }
}

/// Runs every task on every core (a shared queue, so uneven tasks balance); results in task
/// order.
fn run_tasks(
    req: &TrainRequest,
    data: &[Rows],
    orders: &[Vec<usize>],
    tasks: &[Task],
) -> Vec<Result<Done, TrainError>> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let workers = std::thread::available_parallelism().map_or(1, usize::from).min(tasks.len());
    let mut out: Vec<Option<Result<Done, TrainError>>> = (0..tasks.len()).map(|_| None).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&task) = tasks.get(i) else { break };
                        mine.push((i, run_task(req, data, orders, task)));
                    }
                    mine
                })
            })
            .collect();
        for h in handles {
            // A fit that panics is caught inside it; a worker that panics anyway leaves its
            // tasks without a result, reported below.
            for (i, r) in h.join().unwrap_or_default() {
                out[i] = Some(r);
            }
        }
    });
    out.into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                Err(TrainError::BadRequest("internal: a training thread panicked".into()))
            })
        })
        .collect()
}

/// Trains a model from labelled samples.
pub fn train(req: &TrainRequest, samples: &[LabelledSample]) -> Result<EnergyModel, TrainError> {
    if req.folds < 2 {
        return Err(TrainError::BadRequest(format!(
            "{} folds; cross-validation needs at least 2",
            req.folds
        )));
    }
    if req.features.is_empty() {
        return Err(TrainError::BadRequest("no features to train on".into()));
    }
    if !(req.alpha.is_finite() && req.alpha >= 0.0) {
        return Err(TrainError::BadRequest(format!(
            "alpha {} must be a non-negative number",
            req.alpha
        )));
    }
    let n_p = req.pstates.len();
    let k = req.features.len();
    let mut per_pstate: Vec<Rows> = (0..n_p).map(|_| Rows { k, ..Rows::default() }).collect();
    for (i, s) in samples.iter().enumerate() {
        let bad = |problem: String| TrainError::BadSample { sample: i, problem };
        let rows = per_pstate.get_mut(s.pstate).ok_or(TrainError::UnknownPState {
            sample: i,
            pstate: s.pstate,
            len: n_p,
        })?;
        let fv = features::derive(&s.counters).map_err(|e| bad(e.to_string()))?;
        for &f in &req.features {
            let v = fv.get(f).ok_or_else(|| bad(format!("feature {f} was not measured")))?;
            if !v.is_finite() {
                return Err(bad(format!("feature {f} is {v}")));
            }
            rows.x.push(v);
        }
        for (t, v) in [s.labels.perf, s.labels.power, s.labels.throughput].into_iter().enumerate() {
            if !v.is_finite() {
                return Err(bad(format!("{} label is {v}", Target::ALL[t])));
            }
            rows.y[t].push(v);
        }
    }
    let need = MIN_SAMPLES_PER_PSTATE.max(2 * req.folds as usize).max(k + 2);
    for (pstate, rows) in per_pstate.iter().enumerate() {
        match rows.len() {
            0 => {
                return Err(TrainError::NoSamples {
                    pstate,
                    ghz: req.pstates.frequency_hz(pstate).unwrap_or(0.0) / 1e9,
                });
            }
            have if have < need => return Err(TrainError::TooFewSamples { pstate, have, need }),
            _ => {}
        }
    }
    // A fixed seed: the same data always gives the same folds, hence the same figures. The
    // orders are drawn in P-state order before the P-states are fitted side by side.
    let mut rng = ChaCha8Rng::seed_from_u64(0x0076_6d67_6f76);
    let orders: Vec<Vec<usize>> = per_pstate
        .iter()
        .map(|data| {
            let mut order: Vec<usize> = (0..data.len()).collect();
            order.shuffle(&mut rng);
            order
        })
        .collect();
    // Every fold of every P-state, and every P-state's fit on all its rows, is independent:
    // they run on every core.
    let folds = req.folds as usize;
    let tasks: Vec<Task> = (0..n_p)
        .flat_map(|pstate| {
            (0..folds)
                .map(move |fold| Task::Fold { pstate, fold })
                .chain(std::iter::once(Task::All { pstate }))
        })
        .collect();
    let mut done = run_tasks(req, &per_pstate, &orders, &tasks).into_iter();
    let mut models = Vec::with_capacity(n_p);
    let mut quality_figures = Vec::new();
    let mut ever_kept = vec![false; k];
    for pstate in 0..n_p {
        let mut truth: [Vec<f64>; 3] = Default::default();
        let mut predicted: [Vec<f64>; 3] = Default::default();
        let mut fitted = None;
        // Tasks come back in the order they were listed: the folds in order, then the fit.
        for _ in 0..=folds {
            match done.next() {
                Some(Ok(Done::Fold { truth: t, predicted: p })) => {
                    for i in 0..3 {
                        truth[i].extend_from_slice(&t[i]);
                        predicted[i].extend_from_slice(&p[i]);
                    }
                }
                Some(Ok(Done::All { fits, kept })) => fitted = Some((fits, kept)),
                Some(Err(e)) => return Err(e),
                None => break,
            }
        }
        let Some(([perf, power, throughput], kept)) = fitted else {
            return Err(TrainError::BadRequest("internal: a P-state was not fitted".into()));
        };
        for j in kept {
            ever_kept[j] = true;
        }
        for (t, target) in Target::ALL.into_iter().enumerate() {
            let (r2, mae, mape) = quality(&truth[t], &predicted[t]);
            quality_figures.push(FitQuality {
                pstate_index: u32::try_from(pstate).unwrap_or(u32::MAX),
                target,
                r2,
                mae,
                mape,
            });
        }
        models.push(PStateModel {
            frequency_hz: req.pstates.frequency_hz(pstate).unwrap_or(0.0),
            perf,
            power,
            throughput,
        });
    }
    let model = EnergyModel {
        hardware_class: req.hardware_class.clone(),
        version: req.version,
        pstates: req.pstates.clone(),
        features: req.features.clone(),
        per_pstate: models,
        training: TrainingInfo {
            algorithm: req.algorithm,
            alpha: req.alpha,
            sample_count: samples.len() as u64,
            folds: req.folds,
            quality: quality_figures,
            created_unix_ms: req.created_unix_ms,
            dropped_features: req
                .features
                .iter()
                .zip(&ever_kept)
                .filter(|(_, k)| !**k)
                .map(|(f, _)| *f)
                .collect(),
            notes: req.notes.clone(),
        },
    };
    model.validate()?;
    Ok(model)
}

#[cfg(test)]
mod tests;
