//! The tensor model: every value varies over a subset of `[batch, class, spatial]`.

use std::fmt;

/// A set of the three axes, as bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct AxisSet(u8);

/// The axes in layout order, with their names.
pub const AXES: [(AxisSet, &str); 3] =
    [(AxisSet::BATCH, "batch"), (AxisSet::CLASS, "class"), (AxisSet::SPATIAL, "spatial")];

impl AxisSet {
    pub const NONE: AxisSet = AxisSet(0);
    pub const BATCH: AxisSet = AxisSet(1);
    pub const CLASS: AxisSet = AxisSet(2);
    pub const SPATIAL: AxisSet = AxisSet(4);
    pub const ALL: AxisSet = AxisSet(7);

    pub fn from_name(name: &str) -> Option<AxisSet> {
        AXES.iter().find(|(_, n)| *n == name).map(|(a, _)| *a)
    }
    pub fn union(self, o: AxisSet) -> AxisSet {
        AxisSet(self.0 | o.0)
    }
    pub fn intersect(self, o: AxisSet) -> AxisSet {
        AxisSet(self.0 & o.0)
    }
    pub fn minus(self, o: AxisSet) -> AxisSet {
        AxisSet(self.0 & !o.0)
    }
    pub fn contains(self, o: AxisSet) -> bool {
        self.0 & o.0 == o.0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// Whether axis number `i` (0 batch, 1 class, 2 spatial) is in the set.
    pub fn has_index(self, i: usize) -> bool {
        self.0 & (1 << i) != 0
    }
    pub fn names(self) -> Vec<&'static str> {
        AXES.iter().filter(|(a, _)| self.contains(*a)).map(|(_, n)| *n).collect()
    }
}

impl fmt::Display for AxisSet {
    /// `scalar`, `class`, or `(batch, spatial)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = self.names();
        match names.len() {
            0 => f.write_str("scalar"),
            1 => f.write_str(names[0]),
            _ => write!(f, "({})", names.join(", ")),
        }
    }
}
