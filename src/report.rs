//! PNG plots for training reports: line charts of per-epoch metrics and
//! histograms of weight magnitudes.
//!
//! Plots are drawn with plotters into an in-memory RGB buffer, encoded as PNG
//! with the `image` crate and written atomically with [`fsio::write_atomic`],
//! so a failed or interrupted call never leaves a partial file at `path`.
//! Text uses DejaVu Sans, embedded in the binary (see `assets/README.md`), so
//! no system font is needed.

use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;

use crate::error::{Error, Result};
use crate::fsio;

/// Width of every plot, in pixels.
const WIDTH: u32 = 900;
/// Height of every plot, in pixels.
const HEIGHT: u32 = 600;

/// Font family name under which the embedded font is registered with plotters.
const FONT_FAMILY: &str = "sans-serif";
/// DejaVu Sans 2.37 (Bitstream Vera licence, see `assets/README.md`).
const FONT_BYTES: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

const TITLE_FONT_SIZE: u32 = 28;
const AXIS_DESCRIPTION_FONT_SIZE: u32 = 20;
const TICK_LABEL_FONT_SIZE: u32 = 16;
const LEGEND_FONT_SIZE: u32 = 17;

/// Series with at most this many finite points get a dot at every point.
pub const MARKER_LIMIT: usize = 40;

/// Largest accepted bin count. Beyond the plot's width in pixels, extra bins
/// only cost memory and drawing time, so this is a guard against typos.
pub const MAX_BINS: usize = 10_000;

/// Colours of consecutive series: the matplotlib "tab10" palette, which stays
/// distinguishable in print and for the common forms of colour blindness.
/// Series beyond ten fall back to plotters' `Palette99`.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One line of a line chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text of the line.
    pub label: String,
    /// The `(x, y)` points, joined in the order given. Points with a NaN or
    /// infinite coordinate are skipped and break the line there.
    pub points: Vec<(f64, f64)>,
}

/// Writes a line chart PNG, such as a metric per epoch, with a title, axis
/// labels and a legend. Optional horizontal reference lines `(label, y)` are
/// drawn dashed.
///
/// Each series gets its own colour. Points with a NaN or infinite coordinate
/// are skipped with a `tracing` warning and leave a gap in their line, and so
/// are reference lines with a non-finite `y`. Series of at most
/// [`MARKER_LIMIT`] points also get a dot at each point, so a single point
/// stays visible. The legend goes into the corner with the least data under it.
///
/// # Errors
///
/// [`Error::Config`] when `series` is empty or no series has a finite point,
/// or when the values span more than `f64` can represent. [`Error::Io`] when
/// drawing or writing `path` fails.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    references: &[(String, f64)],
) -> Result<()> {
    if series.is_empty() {
        return Err(Error::config(
            "line chart series",
            "[]",
            "pass at least one series with a finite point",
        ));
    }
    let runs: Vec<Vec<Vec<(f64, f64)>>> = series.iter().map(finite_runs).collect();
    let references: Vec<(&str, f64)> = finite_references(references);

    let x_values = runs.iter().flatten().flatten().map(|&(x, _)| x);
    let Some(x_bounds) = bounds(x_values) else {
        let labels: Vec<String> = series.iter().map(|s| format!("{:?}", s.label)).collect();
        return Err(Error::config(
            "line chart series",
            labels.join(", "),
            "no series contains a point with finite x and y. Pass at least one such point",
        ));
    };
    let y_values = runs.iter().flatten().flatten().map(|&(_, y)| y);
    let reference_values = references.iter().map(|&(_, y)| y);
    // A finite point exists at this stage, so the y bounds exist too.
    let y_bounds = bounds(y_values.chain(reference_values)).unwrap_or(x_bounds);

    let x_range = padded_range("x", x_bounds, 0.0)?;
    let y_range = padded_range("y", y_bounds, 0.05)?;

    let plot = LinePlot {
        title,
        x_label,
        y_label,
        x_range,
        y_range,
        series,
        runs: &runs,
        references: &references,
    };
    render_png(path, |root| plot.draw(root))
}

/// Writes a histogram PNG of the magnitudes of several named sets of values
/// (for example "regular |W|", "P" and "N"), with `bins` bins over their
/// common range and an optional logarithmic count axis.
///
/// The sets are drawn side by side: each bin is split into
/// one bar per set, in the set's colour, so no set hides another. Bins span
/// `[min, max]` of all finite magnitudes `|v|`, with `max` in the last bin.
/// NaN and infinite values are skipped with a `tracing` warning. With `log_y`
/// the count axis is logarithmic and starts at 0.5, so a bin with a count of
/// one still shows a bar and empty bins show none.
///
/// # Errors
///
/// [`Error::Config`] when `bins` is 0 or above [`MAX_BINS`], when `sets` is
/// empty or contains no finite value, or when the values span more than `f64`
/// can represent. [`Error::Io`] when drawing or writing `path` fails.
pub fn histogram(
    path: &Path,
    title: &str,
    x_label: &str,
    sets: &[(String, Vec<f64>)],
    bins: usize,
    log_y: bool,
) -> Result<()> {
    if bins == 0 || bins > MAX_BINS {
        return Err(Error::config(
            "histogram bins",
            bins,
            format!("pass a bin count from 1 to {MAX_BINS}"),
        ));
    }
    if sets.is_empty() {
        return Err(Error::config(
            "histogram sets",
            "[]",
            "pass at least one set with a finite value",
        ));
    }
    let magnitudes: Vec<Vec<f64>> = sets
        .iter()
        .map(|(label, values)| finite_magnitudes(label, values))
        .collect();
    let Some(bounds) = bounds(magnitudes.iter().flatten().copied()) else {
        let labels: Vec<String> = sets.iter().map(|(l, _)| format!("{l:?}")).collect();
        return Err(Error::config(
            "histogram sets",
            labels.join(", "),
            "no set contains a finite value. Pass at least one finite value",
        ));
    };
    let x_range = padded_range("x", bounds, 0.0)?;
    // Magnitudes are never negative, so a range widened around 0 starts at 0.
    let x_range = x_range.start.max(0.0)..x_range.end;
    let counts: Vec<Vec<u64>> = magnitudes
        .iter()
        .map(|values| bin_counts(values, &x_range, bins))
        .collect();
    let max_count = counts.iter().flatten().copied().max().unwrap_or(1).max(1) as f64;

    // Headroom above the highest bar: a factor 3 on the log axis, 8% on the
    // linear one.
    let y_top = if log_y {
        max_count * 3.0
    } else {
        max_count * 1.08
    };
    let plot = HistogramPlot {
        title,
        x_label,
        x_range,
        sets,
        counts: &counts,
        log_y,
        y_top,
    };
    if log_y {
        let y_range = (LOG_BASELINE..y_top).log_scale();
        render_png(path, |root| plot.draw(root, y_range, LOG_BASELINE))
    } else {
        render_png(path, |root| plot.draw(root, 0.0..y_top, 0.0))
    }
}

/// Lower end of a logarithmic count axis, and the base of its bars.
const LOG_BASELINE: f64 = 0.5;

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// Everything [`line_chart`] draws, after validation.
struct LinePlot<'a> {
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
    x_range: Range<f64>,
    y_range: Range<f64>,
    series: &'a [Series],
    /// Per series, its runs of consecutive finite points.
    runs: &'a [Vec<Vec<(f64, f64)>>],
    references: &'a [(&'a str, f64)],
}

impl LinePlot<'_> {
    fn draw(&self, root: &DrawingArea<BitMapBackend<'_>, Shift>) -> DrawResult {
        let mut chart = chart_builder(root, self.title)
            .build_cartesian_2d(self.x_range.clone(), self.y_range.clone())?;
        configure_mesh(&mut chart, self.x_label, self.y_label)?;

        for (index, (series, runs)) in self.series.iter().zip(self.runs).enumerate() {
            let color = series_color(index);
            let line_style = color.stroke_width(2);
            let annotation = chart.draw_series(
                runs.iter()
                    .map(|run| PathElement::new(run.clone(), line_style)),
            )?;
            annotation
                .label(series.label.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
                });

            let point_count: usize = runs.iter().map(Vec::len).sum();
            if point_count <= MARKER_LIMIT {
                let markers = runs
                    .iter()
                    .flatten()
                    .map(|&p| Circle::new(p, 3, color.filled()));
                chart.draw_series(markers)?;
            }
        }

        for (offset, &(label, y)) in self.references.iter().enumerate() {
            let color = series_color(self.series.len() + offset);
            let ends = [(self.x_range.start, y), (self.x_range.end, y)];
            let dashed = DashedLineSeries::new(ends, 10, 6, color.stroke_width(2));
            chart
                .draw_series(dashed)?
                .label(label)
                .legend(move |(x, y)| {
                    DashedPathElement::new(vec![(x, y), (x + 24, y)], 6, 4, color.stroke_width(2))
                });
        }

        let occupied = self.occupied_points();
        let labels = self
            .series
            .iter()
            .map(|s| s.label.as_str())
            .chain(self.references.iter().map(|&(label, _)| label));
        draw_legend(&mut chart, &occupied, labels)?;
        Ok(())
    }

    /// Returns points along every line, as fractions of the plotting area
    /// with (0, 0) at the lower left, for choosing the legend corner.
    fn occupied_points(&self) -> Vec<(f64, f64)> {
        let to_fraction =
            |(x, y): (f64, f64)| (fraction(x, &self.x_range), fraction(y, &self.y_range));
        let mut occupied = Vec::new();
        for run in self.runs.iter().flatten() {
            occupied.extend(run.iter().copied().map(to_fraction));
            for pair in run.windows(2) {
                let (start, end) = (to_fraction(pair[0]), to_fraction(pair[1]));
                occupied.extend(interpolate(start, end));
            }
        }
        for &(_, y) in self.references {
            let y = fraction(y, &self.y_range);
            occupied.extend(interpolate((0.0, y), (1.0, y)));
        }
        occupied
    }
}

/// Everything [`histogram`] draws, after validation and binning.
struct HistogramPlot<'a> {
    title: &'a str,
    x_label: &'a str,
    x_range: Range<f64>,
    sets: &'a [(String, Vec<f64>)],
    /// Per set, its count in each bin.
    counts: &'a [Vec<u64>],
    log_y: bool,
    /// Upper end of the count axis.
    y_top: f64,
}

impl HistogramPlot<'_> {
    /// Draws the bars from `baseline` up on the count axis `y_range`, which
    /// is linear or logarithmic.
    fn draw<Y>(
        &self,
        root: &DrawingArea<BitMapBackend<'_>, Shift>,
        y_range: Y,
        baseline: f64,
    ) -> DrawResult
    where
        Y: AsRangedCoord<Value = f64>,
        Y::CoordDescType: ValueFormatter<f64>,
    {
        let mut chart =
            chart_builder(root, self.title).build_cartesian_2d(self.x_range.clone(), y_range)?;
        let y_label = if self.log_y {
            "count (log scale)"
        } else {
            "count"
        };
        configure_mesh(&mut chart, self.x_label, y_label)?;

        let bins = self.counts.first().map_or(1, Vec::len);
        let bin_width = (self.x_range.end - self.x_range.start) / bins as f64;
        let bar_width = bin_width / self.sets.len() as f64;
        for (index, ((label, _), counts)) in self.sets.iter().zip(self.counts).enumerate() {
            let color = series_color(index);
            let bars = counts
                .iter()
                .enumerate()
                .filter(|&(_, &count)| count > 0)
                .map(|(bin, &count)| {
                    let left =
                        self.x_range.start + bin as f64 * bin_width + index as f64 * bar_width;
                    Rectangle::new(
                        [(left, baseline), (left + bar_width, count as f64)],
                        color.filled(),
                    )
                });
            chart
                .draw_series(bars)?
                .label(label.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 24, y + 6)], color.filled())
                });
        }

        let occupied = self.occupied_points(baseline);
        draw_legend(
            &mut chart,
            &occupied,
            self.sets.iter().map(|(l, _)| l.as_str()),
        )?;
        Ok(())
    }

    /// Returns points covering every bar, as fractions of the plotting area
    /// with (0, 0) at the lower left, for choosing the legend corner.
    fn occupied_points(&self, baseline: f64) -> Vec<(f64, f64)> {
        let height_fraction = |count: f64| {
            if self.log_y {
                (count / baseline).ln() / (self.y_top / baseline).ln()
            } else {
                count / self.y_top
            }
        };
        let bins = self.counts.first().map_or(1, Vec::len);
        let mut occupied = Vec::new();
        for counts in self.counts {
            for (bin, &count) in counts.iter().enumerate() {
                if count > 0 {
                    let x = (bin as f64 + 0.5) / bins as f64;
                    let top = height_fraction(count as f64);
                    occupied.extend(interpolate((x, 0.0), (x, top)));
                }
            }
        }
        occupied
    }
}

/// Draws into a `WIDTH` x `HEIGHT` white canvas with `draw`, encodes it as
/// PNG and writes it atomically to `path`.
fn render_png(
    path: &Path,
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> DrawResult,
) -> Result<()> {
    register_font().map_err(|message| drawing_error(path, message))?;

    let mut pixels = vec![0u8; WIDTH as usize * HEIGHT as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (WIDTH, HEIGHT)).into_drawing_area();
        let drawn = root
            .fill(&WHITE)
            .map_err(Into::into)
            .and_then(|()| draw(&root))
            .and_then(|()| root.present().map_err(Into::into));
        drawn.map_err(|e| drawing_error(path, e.to_string()))?;
    }

    let mut png = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut png),
        &pixels,
        WIDTH,
        HEIGHT,
        image::ColorType::Rgb8,
    )
    .map_err(|e| drawing_error(path, format!("PNG encoding failed: {e}")))?;
    fsio::write_atomic(path, &png)
}

/// Registers the embedded font with plotters, once per process.
///
/// NOTE: plotters 0.3.7 draws ab_glyph text without each glyph's left side
/// bearing, so letter spacing is slightly uneven ("constan t"). Text stays
/// readable, and a fix belongs in plotters.
fn register_font() -> std::result::Result<(), String> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, FONT_BYTES)
                .map_err(|_| "the embedded DejaVu Sans font is not a valid font file".to_string())
        })
        .clone()
}

/// Wraps a plotting failure as an I/O error on `path`, the file it was for.
fn drawing_error(path: &Path, message: impl std::fmt::Display) -> Error {
    let message = format!("drawing the plot failed: {message}");
    Error::io(path, std::io::Error::other(message))
}

/// Starts a chart with the shared title, margins and label areas.
fn chart_builder<'a, 'b>(
    root: &'a DrawingArea<BitMapBackend<'b>, Shift>,
    title: &str,
) -> ChartBuilder<'a, 'b, BitMapBackend<'b>> {
    let mut builder = ChartBuilder::on(root);
    builder
        .caption(title, (FONT_FAMILY, TITLE_FONT_SIZE))
        .margin(16)
        .margin_right(28)
        .x_label_area_size(56)
        .y_label_area_size(88);
    builder
}

/// Draws the grid, the ticks and the axis descriptions.
fn configure_mesh<X, Y>(
    chart: &mut ChartContext<'_, BitMapBackend<'_>, Cartesian2d<X, Y>>,
    x_label: &str,
    y_label: &str,
) -> DrawResult
where
    X: Ranged<ValueType = f64> + ValueFormatter<f64>,
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    chart
        .configure_mesh()
        .x_label_formatter(&format_tick)
        .y_label_formatter(&format_tick)
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style((FONT_FAMILY, TICK_LABEL_FONT_SIZE))
        .axis_desc_style((FONT_FAMILY, AXIS_DESCRIPTION_FONT_SIZE))
        .light_line_style(RGBColor(235, 235, 235))
        .bold_line_style(RGBColor(215, 215, 215))
        .x_labels(10)
        .y_labels(10)
        .draw()?;
    Ok(())
}

/// Draws the legend of `labels` into the corner of the plotting area that
/// covers the fewest `occupied` points (fractions, (0, 0) at lower left).
fn draw_legend<'a, 'b, DB, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    occupied: &[(f64, f64)],
    labels: impl Iterator<Item = &'b str>,
) -> DrawResult
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    X: Ranged,
    Y: Ranged,
{
    let labels: Vec<&str> = labels.collect();
    let (pixel_x, pixel_y) = chart.plotting_area().get_pixel_range();
    let area_width = (pixel_x.end - pixel_x.start).max(1) as f64;
    let area_height = (pixel_y.end - pixel_y.start).max(1) as f64;
    // NOTE: the legend size is an estimate (about 0.6 em per character plus
    // the sample line and padding), used only to choose the corner.
    let longest = labels.iter().map(|l| l.chars().count()).max().unwrap_or(0) as f64;
    let legend_width = (longest * 0.6 * LEGEND_FONT_SIZE as f64 + 60.0) / area_width;
    let legend_height = (labels.len() as f64 * 1.4 * LEGEND_FONT_SIZE as f64 + 20.0) / area_height;
    let position = least_occupied_corner(occupied, legend_width.min(1.0), legend_height.min(1.0));

    chart
        .configure_series_labels()
        .position(position)
        .margin(10)
        .legend_area_size(30)
        .label_font((FONT_FAMILY, LEGEND_FONT_SIZE))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(160, 160, 160))
        .draw()?;
    Ok(())
}

/// Picks the corner whose `width` x `height` box (fractions of the plotting
/// area) contains the fewest `occupied` points. Ties go to the first corner
/// in the order upper right, upper left, lower right, lower left.
fn least_occupied_corner(occupied: &[(f64, f64)], width: f64, height: f64) -> SeriesLabelPosition {
    let corners = [
        (
            SeriesLabelPosition::UpperRight,
            1.0 - width..1.0,
            1.0 - height..1.0,
        ),
        (
            SeriesLabelPosition::UpperLeft,
            0.0..width,
            1.0 - height..1.0,
        ),
        (
            SeriesLabelPosition::LowerRight,
            1.0 - width..1.0,
            0.0..height,
        ),
        (SeriesLabelPosition::LowerLeft, 0.0..width, 0.0..height),
    ];
    let mut best = SeriesLabelPosition::UpperRight;
    let mut best_count = usize::MAX;
    for (position, xs, ys) in corners {
        let count = occupied
            .iter()
            .filter(|&&(x, y)| xs.start <= x && x <= xs.end && ys.start <= y && y <= ys.end)
            .count();
        if count < best_count {
            best = position;
            best_count = count;
        }
    }
    best
}

/// Formats a tick value without trailing zeros ("5", "0.25"), switching to
/// scientific notation ("2e5", "1.5e-4") for very large or small values.
fn format_tick(value: &f64) -> String {
    let value = *value;
    let magnitude = value.abs();
    if magnitude == 0.0 {
        return "0".to_string();
    }
    if (1e-3..1e5).contains(&magnitude) {
        // Six decimals hide float noise such as 0.30000000000000004.
        // NOTE: ticks less than 1e-6 apart therefore print the same text.
        let text = format!("{value:.6}");
        return text.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    let text = format!("{value:.3e}");
    let (mantissa, exponent) = text.split_once('e').unwrap_or((&text, "0"));
    let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
    format!("{mantissa}e{exponent}")
}

/// Returns points evenly spaced from `start` to `end`, both excluded.
fn interpolate(start: (f64, f64), end: (f64, f64)) -> impl Iterator<Item = (f64, f64)> {
    const STEPS: usize = 20;
    (1..STEPS).map(move |step| {
        let t = step as f64 / STEPS as f64;
        (
            start.0 + t * (end.0 - start.0),
            start.1 + t * (end.1 - start.1),
        )
    })
}

/// Returns where `value` lies in `range`, as a fraction (0 at the start).
fn fraction(value: f64, range: &Range<f64>) -> f64 {
    (value - range.start) / (range.end - range.start)
}

/// Returns the colour of the series with this index.
fn series_color(index: usize) -> RGBColor {
    match PALETTE.get(index) {
        Some(&color) => color,
        None => {
            let (r, g, b) = Palette99::pick(index - PALETTE.len()).rgb();
            RGBColor(r, g, b)
        }
    }
}

/// Splits the points of `series` into runs of consecutive finite points and
/// logs how many points were skipped.
fn finite_runs(series: &Series) -> Vec<Vec<(f64, f64)>> {
    let mut runs = Vec::new();
    let mut current = Vec::new();
    let mut skipped = 0usize;
    for &(x, y) in &series.points {
        if x.is_finite() && y.is_finite() {
            current.push((x, y));
        } else {
            skipped += 1;
            if !current.is_empty() {
                runs.push(std::mem::take(&mut current));
            }
        }
    }
    if !current.is_empty() {
        runs.push(current);
    }
    if skipped > 0 {
        tracing::warn!(
            series = %series.label,
            skipped,
            total = series.points.len(),
            "line chart: skipping points with a NaN or infinite coordinate"
        );
    }
    if series.points.is_empty() {
        tracing::warn!(series = %series.label, "line chart: series has no points");
    }
    runs
}

/// Returns the reference lines with a finite `y`, logging the others.
fn finite_references(references: &[(String, f64)]) -> Vec<(&str, f64)> {
    let mut finite = Vec::with_capacity(references.len());
    for (label, y) in references {
        if y.is_finite() {
            finite.push((label.as_str(), *y));
        } else {
            tracing::warn!(reference = %label, y, "line chart: skipping reference line with a non-finite y");
        }
    }
    finite
}

/// Returns the magnitudes of the finite `values` of the set `label`, logging
/// how many values were skipped.
fn finite_magnitudes(label: &str, values: &[f64]) -> Vec<f64> {
    let magnitudes: Vec<f64> = values
        .iter()
        .filter(|v| v.is_finite())
        .map(|v| v.abs())
        .collect();
    let skipped = values.len() - magnitudes.len();
    if skipped > 0 {
        tracing::warn!(
            set = %label,
            skipped,
            total = values.len(),
            "histogram: skipping NaN or infinite values"
        );
    }
    if values.is_empty() {
        tracing::warn!(set = %label, "histogram: set has no values");
    }
    magnitudes
}

/// Counts `values` into `bins` equal bins over `range`. Values at or beyond
/// `range.end` go into the last bin.
fn bin_counts(values: &[f64], range: &Range<f64>, bins: usize) -> Vec<u64> {
    let mut counts = vec![0u64; bins];
    let span = range.end - range.start;
    for &value in values {
        let position = (value - range.start) / span * bins as f64;
        // The float-to-int cast saturates, so negative positions land in bin 0.
        let bin = (position as usize).min(bins - 1);
        counts[bin] += 1;
    }
    counts
}

/// Returns the minimum and maximum of `values`, or `None` when it is empty.
fn bounds(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

/// Returns `lo..hi` extended by `margin` times its span on each side. A range
/// with `lo == hi` is widened by 10% of `|lo|` each side, or by 1 around 0.
fn padded_range(axis: &str, (lo, hi): (f64, f64), margin: f64) -> Result<Range<f64>> {
    let span = hi - lo;
    let (start, end) = if span > 0.0 {
        (lo - margin * span, hi + margin * span)
    } else {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        (lo - pad, hi + pad)
    };
    if !(span.is_finite() && start.is_finite() && end.is_finite() && start < end) {
        return Err(Error::config(
            format!("{axis} range"),
            format!("{lo}..{hi}"),
            "the span of the values exceeds the f64 range, so rescale them",
        ));
    }
    Ok(start..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `path` back and checks its size and that it is not one flat colour.
    fn assert_plot_png(path: &Path) {
        let image = image::open(path)
            .expect("plot must be a readable PNG")
            .to_rgb8();
        assert_eq!(image.dimensions(), (WIDTH, HEIGHT));
        let first = *image.get_pixel(0, 0);
        let distinct = image.pixels().filter(|&&p| p != first).count();
        assert!(
            distinct > 1000,
            "plot is nearly one flat colour: {distinct} other pixels"
        );
    }

    /// Returns how many pixels of the PNG at `path` have exactly `color`.
    fn count_color(path: &Path, color: RGBColor) -> usize {
        let image = image::open(path).unwrap().to_rgb8();
        image
            .pixels()
            .filter(|p| p.0 == [color.0, color.1, color.2])
            .count()
    }

    fn loss_series() -> Vec<Series> {
        let train = (0..30)
            .map(|e| (e as f64, 2.0 * (-0.1 * e as f64).exp()))
            .collect();
        let test = (0..30)
            .map(|e| (e as f64, 2.1 * (-0.08 * e as f64).exp() + 0.1))
            .collect();
        vec![
            Series {
                label: "train loss".into(),
                points: train,
            },
            Series {
                label: "test loss".into(),
                points: test,
            },
        ]
    }

    /// Returns `n` deterministic values spread roughly like trained weights.
    fn weights(n: usize, scale: f64, seed: u64) -> Vec<f64> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                // Sum of uniforms: a cheap bell shape, enough for a plot test.
                let mut sum = 0.0;
                for _ in 0..4 {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    sum += (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
                }
                sum * scale
            })
            .collect()
    }

    #[test]
    fn line_chart_writes_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        let references = [("paper".to_string(), 0.5)];
        line_chart(&path, "Loss", "epoch", "loss", &loss_series(), &references).unwrap();
        assert_plot_png(&path);
        assert!(
            count_color(&path, PALETTE[0]) > 100,
            "first series colour missing"
        );
        assert!(
            count_color(&path, PALETTE[1]) > 100,
            "second series colour missing"
        );
        assert!(
            count_color(&path, PALETTE[2]) > 20,
            "reference line colour missing"
        );
    }

    #[test]
    fn line_chart_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        line_chart(&path, "Loss", "epoch", "loss", &loss_series(), &[]).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("loss.png")]);
    }

    #[test]
    fn line_chart_single_point() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("one.png");
        let series = [Series {
            label: "accuracy".into(),
            points: vec![(1.0, 0.9)],
        }];
        line_chart(&path, "One epoch", "epoch", "accuracy", &series, &[]).unwrap();
        assert_plot_png(&path);
        assert!(
            count_color(&path, PALETTE[0]) > 10,
            "single point marker missing"
        );
    }

    #[test]
    fn line_chart_skips_non_finite_points() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nan.png");
        let series = [Series {
            label: "loss".into(),
            points: vec![
                (0.0, 1.0),
                (1.0, f64::NAN),
                (2.0, 0.5),
                (f64::INFINITY, 0.2),
                (3.0, 0.4),
            ],
        }];
        let references = [("bad".to_string(), f64::NAN)];
        line_chart(&path, "Loss", "epoch", "loss", &series, &references).unwrap();
        assert_plot_png(&path);
    }

    #[test]
    fn line_chart_empty_series_list_is_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.png");
        let error = line_chart(&path, "t", "x", "y", &[], &[]).unwrap_err();
        assert!(matches!(error, Error::Config { .. }), "{error}");
        assert!(!path.exists());
    }

    #[test]
    fn line_chart_no_finite_point_is_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.png");
        let series = [
            Series {
                label: "empty".into(),
                points: vec![],
            },
            Series {
                label: "nan".into(),
                points: vec![(0.0, f64::NAN)],
            },
        ];
        let error = line_chart(&path, "t", "x", "y", &series, &[]).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, Error::Config { .. }), "{message}");
        assert!(message.contains("\"empty\""), "{message}");
        assert!(message.contains("\"nan\""), "{message}");
        assert!(!path.exists());
    }

    #[test]
    fn line_chart_flat_values_widen_range() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flat.png");
        let series = [Series {
            label: "constant".into(),
            points: vec![(5.0, 0.0), (5.0, 0.0)],
        }];
        line_chart(&path, "Flat", "epoch", "value", &series, &[]).unwrap();
        assert_plot_png(&path);
    }

    #[test]
    fn line_chart_overflowing_range_is_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.png");
        let series = [Series {
            label: "huge".into(),
            points: vec![(0.0, -f64::MAX), (1.0, f64::MAX)],
        }];
        let error = line_chart(&path, "t", "x", "y", &series, &[]).unwrap_err();
        assert!(matches!(error, Error::Config { .. }), "{error}");
    }

    #[test]
    fn series_colors_are_distinct() {
        let colors: Vec<RGBColor> = (0..30).map(series_color).collect();
        for (i, a) in colors.iter().enumerate() {
            for b in &colors[i + 1..] {
                assert_ne!(a, b, "series colours repeat");
            }
        }
    }

    #[test]
    fn line_chart_extreme_values() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&str, Vec<(f64, f64)>); 5] = [
            ("tiny-span", vec![(0.0, 1.0), (1.0, 1.0 + 1e-15)]),
            ("subnormal", vec![(0.0, 0.0), (1.0, 1e-310)]),
            ("huge", vec![(0.0, -1e300), (1e300, 1e300)]),
            ("negative", vec![(-5.0, -3.0), (-1.0, -7.0)]),
            (
                "many-points",
                (0..200_000).map(|i| (i as f64, (i as f64).sin())).collect(),
            ),
        ];
        for (name, points) in cases {
            let path = dir.path().join(format!("{name}.png"));
            let series = [Series {
                label: name.into(),
                points,
            }];
            line_chart(&path, name, "x", "y", &series, &[]).unwrap();
            assert_plot_png(&path);
        }
    }

    #[test]
    fn histogram_extreme_values() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&str, Vec<f64>); 3] = [
            ("tiny-span", vec![1.0, 1.0 + 1e-15]),
            ("huge", vec![0.0, 1e300, -1e300]),
            ("subnormal", vec![0.0, 1e-310]),
        ];
        for (name, values) in cases {
            let path = dir.path().join(format!("{name}.png"));
            let sets = [(name.to_string(), values)];
            histogram(&path, name, "x", &sets, MAX_BINS, true).unwrap();
            assert_plot_png(&path);
        }
    }

    #[test]
    fn line_chart_missing_directory_is_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("loss.png");
        let error = line_chart(&path, "Loss", "epoch", "loss", &loss_series(), &[]).unwrap_err();
        assert!(matches!(error, Error::Io { .. }), "{error}");
    }

    #[test]
    fn histogram_writes_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weights.png");
        let sets = [
            ("regular |W|".to_string(), weights(5000, 1.0, 1)),
            ("P".to_string(), weights(5000, 0.6, 2)),
            ("N".to_string(), weights(5000, 0.4, 3)),
        ];
        histogram(&path, "Weights", "magnitude", &sets, 40, false).unwrap();
        assert_plot_png(&path);
        for (index, color) in PALETTE[..3].iter().enumerate() {
            assert!(
                count_color(&path, *color) > 500,
                "set {index} colour missing"
            );
        }
    }

    #[test]
    fn histogram_log_y_writes_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weights-log.png");
        let sets = [("W".to_string(), weights(5000, 1.0, 4))];
        histogram(&path, "Weights", "magnitude", &sets, 30, true).unwrap();
        assert_plot_png(&path);
        assert!(count_color(&path, PALETTE[0]) > 500, "bars missing");
    }

    #[test]
    fn histogram_zero_bins_is_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zero.png");
        let sets = [("W".to_string(), vec![1.0, 2.0])];
        let error = histogram(&path, "t", "x", &sets, 0, false).unwrap_err();
        assert!(matches!(error, Error::Config { .. }), "{error}");
        assert!(!path.exists());
    }

    #[test]
    fn histogram_too_many_bins_is_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("many.png");
        let sets = [("W".to_string(), vec![1.0, 2.0])];
        let error = histogram(&path, "t", "x", &sets, MAX_BINS + 1, false).unwrap_err();
        assert!(matches!(error, Error::Config { .. }), "{error}");
    }

    #[test]
    fn histogram_empty_sets_is_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.png");
        let error = histogram(&path, "t", "x", &[], 10, false).unwrap_err();
        assert!(matches!(error, Error::Config { .. }), "{error}");

        let sets = [
            ("P".to_string(), vec![]),
            ("N".to_string(), vec![f64::NAN, f64::INFINITY]),
        ];
        let error = histogram(&path, "t", "x", &sets, 10, true).unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, Error::Config { .. }), "{message}");
        assert!(message.contains("\"P\""), "{message}");
        assert!(!path.exists());
    }

    #[test]
    fn histogram_identical_values_widen_range() {
        let dir = tempfile::tempdir().unwrap();
        for (name, value) in [("zero.png", 0.0), ("two.png", -2.0)] {
            let path = dir.path().join(name);
            let sets = [("W".to_string(), vec![value; 100])];
            histogram(&path, "Constant", "magnitude", &sets, 10, false).unwrap();
            assert_plot_png(&path);
        }
    }

    #[test]
    fn histogram_one_empty_set_among_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("partial.png");
        let sets = [
            ("P".to_string(), weights(100, 1.0, 5)),
            ("N".to_string(), vec![]),
        ];
        histogram(&path, "Partial", "magnitude", &sets, 10, true).unwrap();
        assert_plot_png(&path);
    }

    #[test]
    fn bin_counts_puts_max_in_last_bin() {
        let counts = bin_counts(&[0.0, 0.5, 1.0, 2.0], &(0.0..2.0), 4);
        assert_eq!(counts, vec![1, 1, 1, 1]);
    }

    #[test]
    fn format_tick_trims_zeros() {
        let cases = [
            (0.0, "0"),
            (5.0, "5"),
            (0.25, "0.25"),
            (0.1 + 0.2, "0.3"),
            (-1.5, "-1.5"),
            (3000.0, "3000"),
            (200_000.0, "2e5"),
            (0.000_15, "1.5e-4"),
            (-0.000_15, "-1.5e-4"),
        ];
        for (value, expected) in cases {
            assert_eq!(format_tick(&value), expected, "value {value}");
        }
    }

    #[test]
    fn padded_range_widens_identical_bounds() {
        assert_eq!(padded_range("x", (0.0, 0.0), 0.05).unwrap(), -1.0..1.0);
        let range = padded_range("x", (10.0, 10.0), 0.05).unwrap();
        assert!(range.start < 10.0, "{range:?}");
        assert!(range.end > 10.0, "{range:?}");
    }

    #[test]
    fn legend_avoids_occupied_corner() {
        // A falling line fills the upper left and lower right corners.
        let falling: Vec<(f64, f64)> = interpolate((0.0, 1.0), (1.0, 0.0)).collect();
        let position = least_occupied_corner(&falling, 0.3, 0.3);
        assert!(
            matches!(position, SeriesLabelPosition::UpperRight),
            "{position:?}"
        );
        // A rising line fills the lower left and upper right corners.
        let rising: Vec<(f64, f64)> = interpolate((0.0, 0.0), (1.0, 1.0)).collect();
        let position = least_occupied_corner(&rising, 0.3, 0.3);
        assert!(
            matches!(position, SeriesLabelPosition::UpperLeft),
            "{position:?}"
        );
    }

    /// Renders one example of each plot into `$TMPDIR/report-examples` for a
    /// visual check: `cargo test --lib report::tests::render_examples -- --ignored`.
    #[test]
    #[ignore = "writes example PNGs outside a temporary directory"]
    fn render_examples() {
        let dir = std::env::temp_dir().join("report-examples");
        std::fs::create_dir_all(&dir).unwrap();
        let mut series = loss_series();
        let accuracy = (0..30)
            .map(|e| (e as f64, 0.97 - 0.6 * (-0.2 * e as f64).exp()))
            .collect();
        series.push(Series {
            label: "test accuracy".into(),
            points: accuracy,
        });
        let references = [
            ("regular network accuracy".to_string(), 0.98),
            ("chance".to_string(), 0.1),
        ];
        line_chart(
            &dir.join("line.png"),
            "MNIST, 2 hidden layers",
            "epoch",
            "loss / accuracy",
            &series,
            &references,
        )
        .unwrap();

        let sets = [
            ("regular |W|".to_string(), weights(20000, 1.0, 1)),
            ("P".to_string(), weights(20000, 0.6, 2)),
            ("N".to_string(), weights(20000, 0.4, 3)),
        ];
        histogram(
            &dir.join("histogram.png"),
            "Weight magnitudes, layer 1",
            "|w|",
            &sets,
            40,
            false,
        )
        .unwrap();
        histogram(
            &dir.join("histogram-log.png"),
            "Weight magnitudes, layer 1",
            "|w|",
            &sets,
            40,
            true,
        )
        .unwrap();

        // Edge cases: one point, and a set whose values are all identical.
        let single = [Series {
            label: "accuracy".into(),
            points: vec![(1.0, 0.9)],
        }];
        line_chart(
            &dir.join("line-single-point.png"),
            "One epoch",
            "epoch",
            "accuracy",
            &single,
            &[],
        )
        .unwrap();
        let constant = [
            ("P".to_string(), vec![0.5; 100]),
            ("N".to_string(), vec![-0.5; 40]),
        ];
        histogram(
            &dir.join("histogram-constant.png"),
            "Constant magnitudes",
            "|w|",
            &constant,
            10,
            false,
        )
        .unwrap();
    }
}
