//! Where sorted values live: groups side by side, each in its own sorted order.
//!
//! A sort with `group` axes has one group per combination of those axes; each group
//! holds the elements that share them. Sorted-order values are stored group after
//! group (position `q = g * size + rank`), whatever the group axes, so a group is
//! always one contiguous range. Passes over sorted values walk fixed segments (at
//! most `CHUNK` positions, never crossing a group), so every partial sum and scan
//! carry is cut the same way for any thread count.

use crate::ir::AxisSet;

use super::vm::CHUNK;

/// One piece of a pass over sorted positions.
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    pub group: usize,
    pub q0: usize,
    pub len: usize,
}

#[derive(Clone, Debug)]
pub struct Layout {
    pub ext: [usize; 3],
    /// Extents of the group axes (1 elsewhere): the grid of groups.
    pub gshape: [usize; 3],
    /// Extents of the other axes (1 on group axes): the grid within a group.
    pub nshape: [usize; 3],
    pub groups: usize,
    pub size: usize,
    pub segments: Vec<Segment>,
}

impl Layout {
    pub fn new(ext: [usize; 3], group: AxisSet) -> Layout {
        let gshape: [usize; 3] = std::array::from_fn(|i| if group.has_index(i) { ext[i] } else { 1 });
        let nshape: [usize; 3] = std::array::from_fn(|i| if group.has_index(i) { 1 } else { ext[i] });
        let groups: usize = gshape.iter().product();
        let size: usize = nshape.iter().product();
        let mut segments = Vec::with_capacity(groups * size.div_ceil(CHUNK));
        for g in 0..groups {
            for r0 in (0..size).step_by(CHUNK) {
                segments.push(Segment { group: g, q0: g * size + r0, len: CHUNK.min(size - r0) });
            }
        }
        Layout { ext, gshape, nshape, groups, size, segments }
    }

    pub fn len(&self) -> usize {
        self.groups * self.size
    }

    /// Group `g`'s coordinates.
    pub fn group_coords(&self, g: usize) -> [usize; 3] {
        let [_, c, s] = self.gshape;
        [g / (c * s), (g / s) % c, g % s]
    }

    /// The flat element index of rank `r` (row-major over the non-group axes) in group `g`.
    pub fn element(&self, g: usize, r: usize) -> usize {
        let gc = self.group_coords(g);
        let [_, c, s] = self.nshape;
        let rc = [r / (c * s), (r / s) % c, r % s];
        let [_, ec, es] = self.ext;
        ((gc[0] + rc[0]) * ec + gc[1] + rc[1]) * es + gc[2] + rc[2]
    }

    /// The element index standing for a whole group (zero on the other axes): where a
    /// value constant within groups is read.
    pub fn point(&self, g: usize) -> usize {
        self.element(g, 0)
    }

    /// The element indices of sorted-layout positions `q0..q0 + len` of a segment before
    /// sorting (ranks in element order), into `buf`; true if they are consecutive.
    pub fn unsorted_elements(&self, seg: &Segment, buf: &mut Vec<usize>) -> bool {
        let r0 = seg.q0 - seg.group * self.size;
        let first = self.element(seg.group, r0);
        let last = self.element(seg.group, r0 + seg.len - 1);
        // Element indices grow with rank, so a span of exactly `len` is a range.
        if last - first == seg.len - 1 {
            return true;
        }
        buf.clear();
        buf.extend((r0..r0 + seg.len).map(|r| self.element(seg.group, r)));
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_class_hold_each_class_in_element_order() {
        let l = Layout::new([2, 3, 4], AxisSet::CLASS);
        assert_eq!((l.groups, l.size), (3, 8));
        let members: Vec<usize> = (0..8).map(|r| l.element(1, r)).collect();
        assert_eq!(members, vec![4, 5, 6, 7, 16, 17, 18, 19]);
        assert_eq!(l.point(2), 8);
        let whole = Layout::new([2, 3, 4], AxisSet::NONE);
        assert_eq!((whole.groups, whole.element(0, 23)), (1, 23));
    }
}
