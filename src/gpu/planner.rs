//! The dispatch planner: which strategy a shape gets, how rows are cut into chunks that fit
//! one binding, and how workgroups are laid out on a 2-D grid.
//!
//! The plan depends only on the shape and the device limits, so a given shape on a given
//! adapter always takes the same path and gives the same bits.

use crate::error::{Result, XentError};

/// The most logits one lane folds (or writes) per row. Every shader loop is bounded by it:
/// llvmpipe (Mesa's software Vulkan and GL) ends any loop after 65,535 iterations, silently,
/// and real drivers kill dispatches that run too long. Rows longer than this times the lanes
/// of a workgroup are split across workgroups.
pub const MAX_ELEMENTS_PER_LANE: u64 = 32_768;

/// The most workgroups that share one row.
pub const MAX_SPLIT: u32 = 64;

/// How rows are laid onto workgroups: every strategy is a set of pipeline constants of the
/// same kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Strategy {
    /// Threads per workgroup.
    pub workgroup_size: u32,
    /// Consecutive lanes that share one row (a power of two dividing `workgroup_size`);
    /// the workgroup takes `workgroup_size / lanes_per_row` rows.
    pub lanes_per_row: u32,
    /// Workgroups that share one row (then `lanes_per_row == workgroup_size`), with a
    /// second pass that merges their RowStats; 1 for no split.
    pub split: u32,
    /// 16-byte loads for the aligned body of each row.
    pub vec4: bool,
    /// Lane reductions with subgroup shuffles rather than workgroup memory (needs
    /// `Features::SUBGROUP`).
    pub subgroups: bool,
    /// f16 logits widened by the builtin `unpack2x16float` (where the device has it:
    /// [`DeviceFacts::f16_builtin`]) rather than by integer operations; no effect on other
    /// dtypes. (Native `enable f16` arithmetic is out of reach: naga 30 cannot reinterpret a
    /// u32 as two f16, gfx-rs/wgpu#8896.)
    pub f16_builtin: bool,
}

impl Strategy {
    /// The baseline: one 256-lane workgroup per row, scalar loads.
    pub const NAIVE: Strategy = Strategy {
        workgroup_size: 256,
        lanes_per_row: 256,
        split: 1,
        vec4: false,
        subgroups: false,
        f16_builtin: false,
    };

    /// Rows one workgroup takes.
    pub fn rows_per_group(&self) -> u32 {
        self.workgroup_size / self.lanes_per_row
    }

    /// Rows per workgroup of the last pass over a chunk (the merge pass for a split row),
    /// which writes one workgroup sum each.
    pub fn rows_per_final_group(&self) -> u32 {
        if self.split > 1 {
            self.workgroup_size
        } else {
            self.rows_per_group()
        }
    }

    /// Bytes of workgroup memory the row kernels' reductions use: a RowStats (44 bytes) and a
    /// vec4 sum (16) per lane, or per subgroup with subgroup reductions.
    pub fn workgroup_memory(&self, device: &DeviceFacts) -> u64 {
        let slots = match (self.subgroups, device.subgroup_lanes) {
            (true, Some(lanes)) => (self.workgroup_size / lanes.min(self.workgroup_size)).max(1),
            _ => self.workgroup_size,
        };
        slots as u64 * 60
    }

    /// Logits one lane folds in a row of `classes`.
    pub fn elements_per_lane(&self, classes: usize) -> u64 {
        (classes as u64).div_ceil(self.lanes_per_row as u64 * self.split as u64)
    }

    /// A short name for reports: `rows/wg`, `row/wg`, `split-row`, with `naive` for the baseline.
    pub fn name(&self) -> String {
        if *self == Self::NAIVE {
            return "naive".to_string();
        }
        let loads = match (self.vec4, self.subgroups) {
            (true, true) => "vec4 sg",
            (true, false) => "vec4",
            (false, true) => "scalar sg",
            (false, false) => "scalar",
        };
        let loads = if self.f16_builtin {
            loads.to_string()
        } else {
            format!("{loads} f16int")
        };
        if self.split > 1 {
            format!("split-row x{} {loads}", self.split)
        } else if self.lanes_per_row == self.workgroup_size {
            format!("row/wg {loads}")
        } else {
            format!("{} rows/wg {loads}", self.rows_per_group())
        }
    }

    /// Checks the invariants the kernels rely on.
    pub fn check(&self, device: &DeviceFacts) -> Result<()> {
        let max_workgroup_size = device.max_workgroup_size;
        let bad = |why| {
            Err(XentError::InvalidStrategy {
                strategy: format!("{self:?}"),
                why,
            })
        };
        if !self.workgroup_size.is_power_of_two() || self.workgroup_size > max_workgroup_size {
            return bad("workgroup size must be a power of two within the device limit");
        }
        if !self.lanes_per_row.is_power_of_two() || self.lanes_per_row > self.workgroup_size {
            return bad("lanes per row must be a power of two no larger than the workgroup");
        }
        if self.split == 0 || (self.split > 1 && self.lanes_per_row != self.workgroup_size) {
            return bad("a split row needs one row per workgroup");
        }
        if self.split > MAX_SPLIT {
            return bad("at most 64 workgroups may share a row");
        }
        if self.workgroup_memory(device) > device.max_workgroup_storage_bytes {
            return bad("its reductions need more workgroup memory than the device has");
        }
        if self.subgroups {
            match device.subgroup_lanes {
                None => return bad("this device has no subgroup operations"),
                Some(lanes) if lanes > self.workgroup_size => {
                    return bad("subgroup reductions need a workgroup of at least one subgroup");
                }
                Some(_) => {}
            }
        }
        if self.f16_builtin && !device.f16_builtin {
            return bad("this device has no unpack2x16float (DownlevelFlags::SHADER_F16_IN_F32)");
        }
        Ok(())
    }
}

/// The device facts the planner uses.
#[derive(Clone, Copy, Debug)]
pub struct DeviceFacts {
    /// Largest storage binding, in bytes (after any cap in [`crate::GpuOptions`]).
    pub max_binding_bytes: u64,
    /// Workgroups per grid dimension.
    pub max_groups_per_dimension: u32,
    /// Threads per workgroup.
    pub max_workgroup_size: u32,
    /// The smallest subgroup size, where subgroup operations are available (a power of two).
    pub subgroup_lanes: Option<u32>,
    /// A CPU rasteriser (lavapipe, WARP): lanes run as SIMD across invocations, so scalar
    /// loads by neighbouring lanes beat per-lane vec4 loads there.
    pub cpu: bool,
    /// Storage bindings start at multiples of this many bytes.
    pub binding_alignment: u64,
    /// Workgroup memory per workgroup, in bytes.
    pub max_workgroup_storage_bytes: u64,
    /// The builtin `unpack2x16float` (wgpu's `DownlevelFlags::SHADER_F16_IN_F32`).
    pub f16_builtin: bool,
}

/// Picks the strategy for a shape.
pub fn choose_strategy(rows: usize, classes: usize, device: &DeviceFacts) -> Strategy {
    let workgroup_size = prev_power_of_two(device.max_workgroup_size.min(256) as usize) as u32;
    let subgroups = device.subgroup_lanes.is_some_and(|l| l <= workgroup_size);
    let vectors = classes.div_ceil(4);
    if device.cpu {
        // A CPU rasteriser runs a subgroup as one SIMD loop and a barrier as a switch of
        // fibres: keep each row inside one subgroup, and give each lane a long run of loads.
        let lanes =
            prev_power_of_two(vectors / 16).min(device.subgroup_lanes.unwrap_or(1) as usize) as u32;
        return bounded(
            Strategy {
                workgroup_size,
                lanes_per_row: lanes,
                split: 1,
                vec4: true,
                subgroups,
                f16_builtin: prefer_f16_builtin(device),
            },
            classes,
        );
    }
    // About sixteen vec4 loads per lane before the row's lanes merge: on an H100, fewer lanes
    // per row beat more (8192 x 1000: 16 lanes 0.020 ms, 64 lanes 0.024, 256 lanes 0.048).
    let lanes_per_row = (vectors.div_ceil(16).next_power_of_two() as u32).min(workgroup_size);
    // Long rows, few of them: share each row between workgroups until about a thousand
    // workgroups fill the device, while every lane keeps at least 16 vec4 loads. (An H100
    // is already full with 1024 rows of 128,256 classes: no split there.)
    let split = if lanes_per_row == workgroup_size && rows < 1024 {
        let to_fill = 1024 / rows.max(1);
        let work = vectors / (workgroup_size as usize * 16);
        prev_power_of_two(to_fill.min(work).clamp(1, 64)) as u32
    } else {
        1
    };
    bounded(
        Strategy {
            workgroup_size,
            lanes_per_row,
            split,
            vec4: true,
            subgroups,
            f16_builtin: prefer_f16_builtin(device),
        },
        classes,
    )
}

/// Whether f16 logits are widened by `unpack2x16float` on this device: wherever it has it
/// (both ways are exact; the builtin is one instruction where the integer way is about ten).
fn prefer_f16_builtin(device: &DeviceFacts) -> bool {
    device.f16_builtin
}

/// Raises the lanes per row, then the split, until no lane folds more than
/// [`MAX_ELEMENTS_PER_LANE`] logits of a row (as far as [`MAX_SPLIT`] allows; a longer row is
/// refused by [`ChunkPlan::new`]).
fn bounded(mut s: Strategy, classes: usize) -> Strategy {
    while s.elements_per_lane(classes) > MAX_ELEMENTS_PER_LANE && s.lanes_per_row < s.workgroup_size
    {
        s.lanes_per_row *= 2;
    }
    while s.elements_per_lane(classes) > MAX_ELEMENTS_PER_LANE && s.split < MAX_SPLIT {
        s.split *= 2;
    }
    s
}

fn prev_power_of_two(x: usize) -> usize {
    1 << (usize::BITS - 1 - x.max(1).leading_zeros())
}

/// The grid for `groups` workgroups: x up to the per-dimension limit, then y.
pub fn grid(groups: u32, max_per_dimension: u32) -> (u32, u32) {
    let x = groups.clamp(1, max_per_dimension);
    (x, groups.div_ceil(x).max(1))
}

/// How one call's rows are cut into chunks, each fitting every binding it uses.
///
/// Where one binding holds that many rows, every chunk but the last has a multiple of
/// [`Strategy::rows_per_final_group`] rows, so a workgroup sum covers the same rows whatever
/// the chunk size, and the call's totals do not depend on how it was cut.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkPlan {
    /// Rows per chunk (the last may be shorter).
    pub rows_per_chunk: usize,
    /// Total rows.
    pub rows: usize,
}

impl ChunkPlan {
    /// Plans chunks for `rows` rows of `classes` logits under `strategy`, where one row takes
    /// `row_bytes[b]` bytes in binding `b` (logits, targets, outputs), each binding starting
    /// up to `align` bytes before its data. `max_rows_per_chunk` caps the chunk further
    /// (host uploads are pipelined in smaller chunks).
    pub fn new(
        rows: usize,
        classes: usize,
        strategy: &Strategy,
        device: &DeviceFacts,
        row_bytes: &[u64],
        max_rows_per_chunk: Option<usize>,
    ) -> Result<Self> {
        let limit = device.max_binding_bytes;
        let align = device.binding_alignment;
        let logits_row_bytes = classes as u64 * 4;
        let too_large = XentError::RowTooLarge {
            classes,
            row_bytes: logits_row_bytes,
            limit,
        };
        if strategy.elements_per_lane(classes) > MAX_ELEMENTS_PER_LANE {
            if strategy.split >= MAX_SPLIT && strategy.lanes_per_row >= strategy.workgroup_size {
                return Err(too_large);
            }
            return Err(XentError::InvalidStrategy {
                strategy: strategy.name(),
                why: "a lane would fold more than 32,768 logits of a row: use more lanes or a split",
            });
        }
        // Per row: each binding's bytes, its 16-byte result, and `split` RowStats of 48 bytes.
        let by_binding = row_bytes
            .iter()
            .copied()
            .chain([16, 48 * strategy.split as u64])
            .map(|b| limit.saturating_sub(align) / b.max(1))
            .min()
            .unwrap_or(0);
        if by_binding == 0 {
            return Err(too_large);
        }
        // Keep the whole chunk on one 2-D grid, and row indices within u32.
        let max_groups =
            device.max_groups_per_dimension as u64 * device.max_groups_per_dimension as u64;
        let by_grid = max_groups / strategy.split as u64 * strategy.rows_per_group() as u64;
        let cap = max_rows_per_chunk.map_or(u64::MAX, |c| c as u64);
        let unit = strategy.rows_per_final_group() as u64;
        let rows_per_chunk = by_binding.min(by_grid).min(u32::MAX as u64 / 2).min(cap);
        // Whole final workgroups per chunk where a binding holds that many rows.
        let rows_per_chunk = if rows_per_chunk >= rows as u64 {
            rows as u64
        } else if rows_per_chunk >= unit {
            rows_per_chunk / unit * unit
        } else {
            rows_per_chunk
        };
        Ok(Self {
            rows_per_chunk: (rows_per_chunk as usize).max(1),
            rows,
        })
    }

    /// Workgroup sums of the whole call: one per final workgroup of each chunk.
    pub fn final_groups(&self, strategy: &Strategy) -> usize {
        let unit = strategy.rows_per_final_group() as usize;
        self.chunks().map(|c| c.len().div_ceil(unit)).sum()
    }

    /// The row ranges, in order.
    pub fn chunks(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        (0..self.rows)
            .step_by(self.rows_per_chunk)
            .map(|start| start..(start + self.rows_per_chunk).min(self.rows))
    }
}
