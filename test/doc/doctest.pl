#!/usr/bin/perl
# The documentation as a test (issue 20).  Reads Markdown files and runs
# their SQL examples, top to bottom, one psql session per file, on a fresh
# database each; compares what psql prints with the output block shown under
# each example.  Prints one TAP line per example ("ok N - FILE:LINE" or
# "not ok N - FILE:LINE" followed by a diff).
#
#   perl test/doc/doctest.pl [--accept] [--cover] FILE[=DATABASE] ...
#
# What is an example (the Markdown conventions the doc follows):
#   - a fenced block opened with ```sql is run as it stands (psql input:
#     SQL and psql meta-commands);
#   - a fenced block opened with ``` (no language) or ```text that follows it
#     with only blank lines between is its expected output: what psql -X -q
#     prints for the block (stdout and stderr, as psql prints them with its
#     input on stdin), compared line by line with trailing
#     blanks and leading and trailing empty lines ignored;
#   - an example without an output block passes when psql reports no error
#     (no ERROR, FATAL or psql: line);
#   - <!-- doc-test: skip REASON --> on the line before a fence: the block is
#     not run (an ```sql block) or not required to be produced by one (an
#     output block); REASON says why (a Citus cluster, pg_cron's database,
#     output of another test);
#   - an output block that follows no example, and an indented (4 spaces)
#     block that starts with an SQL statement, fail: every example is either
#     run or explicitly skipped;
#   - every link to a heading ([text](#anchor), or another Markdown file's
#     [text](FILE.md#anchor)) must land on a heading, with GitHub's anchors
#     (lower case, punctuation dropped, spaces to hyphens, -1, -2 for
#     repeated headings): one check per file;
#   - with --cover (for the files after it): every function of schema
#     billing whose name does not start with _ is called by an example that
#     runs, except those the file names in <!-- doc-test: not run: NAME
#     REASON --> (one check per file).
#
# The database is created afresh (DROP DATABASE IF EXISTS, CREATE DATABASE);
# psql connects with PGTZ=UTC and the environment's PGHOST/PGPORT/PGUSER.
# --accept writes FILE.out: the file with every output block replaced by
# what psql printed (for writing the doc; review it before copying it over).
use strict;
use warnings;
use File::Temp qw(tempdir);

my $accept = 0;
my @files;
my $cover = 0;
for (@ARGV) {
    if ($_ eq '--accept') { $accept = 1; }
    elsif ($_ eq '--cover') { $cover = 1; }
    else { push @files, [$_, $cover]; }
}
die "usage: $0 [--accept] FILE[=DATABASE] ...\n" unless @files;

my $tmp = tempdir('billing-doctest.XXXXXX', TMPDIR => 1, CLEANUP => 1);
my $n = 0;
my $failed = 0;

# tap(OK, NAME, DIAG...): one TAP line, diagnostics as comments
sub tap {
    my ($ok, $name, @diag) = @_;
    $n++;
    print(($ok ? "ok" : "not ok") . " $n - $name\n");
    print map { "#   $_\n" } map { split /\n/ } @diag;
    $failed++ unless $ok;
}

# normalize(TEXT): the lines compared: trailing blanks and leading and
# trailing empty lines removed
sub normalize {
    my @l = map { s/\s+$//r } split /\n/, $_[0], -1;
    shift @l while @l && $l[0] eq '';
    pop @l while @l && $l[-1] eq '';
    return join("\n", @l) . (@l ? "\n" : '');
}

# parse(FILE): the fenced blocks of a Markdown file, and the lint problems
sub parse {
    my ($file) = @_;
    open my $fh, '<', $file or die "$file: $!";
    my @lines = <$fh>;
    close $fh;
    chomp @lines;
    my (@blocks, @problems);
    my $i = 0;
    while ($i < @lines) {
        my $line = $lines[$i];
        if ($line =~ /^(\s*)```(\w*)\s*$/) {
            my ($indent, $lang) = (length $1, $2);
            my $start = $i;
            my @body;
            $i++;
            while ($i < @lines && $lines[$i] !~ /^\s*```\s*$/) {
                my $l = $lines[$i];
                $l =~ s/^ {0,$indent}//;
                push @body, $l;
                $i++;
            }
            push @problems, "$file:" . ($start + 1) . ": fence not closed" if $i >= @lines;
            # the marker on the nearest non-blank line above
            my $j = $start - 1;
            $j-- while $j >= 0 && $lines[$j] =~ /^\s*$/;
            my $skip = ($j >= 0 && $lines[$j] =~ /<!--\s*doc-test:\s*skip\b/) ? 1 : 0;
            push @blocks, { lang => $lang, start => $start, end => $i,
                            body => join("\n", @body) . "\n", skip => $skip };
        } elsif ($line =~ /^    (SELECT|INSERT|UPDATE|DELETE|CREATE|ALTER|WITH|SET)\b/
                 && $i > 0 && $lines[$i - 1] =~ /^\s*$/) {
            push @problems, "$file:" . ($i + 1)
                . ": an indented SQL example: fence it with ```sql so that it runs";
        }
        $i++;
    }
    # pair each example with the output block right below it
    for my $k (0 .. $#blocks) {
        my $b = $blocks[$k];
        next unless $b->{lang} eq 'sql' && !$b->{skip};
        my $o = $blocks[$k + 1];
        next unless $o && ($o->{lang} eq '' || $o->{lang} eq 'text');
        my $between = join '', @lines[$b->{end} + 1 .. $o->{start} - 1];
        next unless $between =~ /^\s*$/;
        $b->{expected} = $o;
        $o->{paired} = 1;
    }
    for my $b (@blocks) {
        next if $b->{lang} eq 'sql' || $b->{paired} || $b->{skip};
        next unless $b->{lang} eq '' || $b->{lang} eq 'text';
        push @problems, "$file:" . ($b->{start} + 1)
            . ": an output block that no example above it produces (add the example, or mark it <!-- doc-test: skip REASON -->)"
            if $b->{body} =~ /^[-+]{3,}$|^(ERROR|NOTICE|WARNING):/m;
    }
    return (\@lines, \@blocks, \@problems);
}

# anchors(FILE): the anchors GitHub gives the headings of a Markdown file
sub anchors {
    my ($file) = @_;
    open my $fh, '<', $file or return {};
    my (%seen, %a);
    my $fence = 0;
    while (my $l = <$fh>) {
        $fence = !$fence if $l =~ /^\s*```/;
        next if $fence || $l !~ /^#{1,6}\s+(.*?)\s*$/;
        (my $slug = lc $1) =~ s/[^\w\- ]//g;
        $slug =~ tr/ /-/;
        my $n = $seen{$slug}++;
        $a{$n ? "$slug-$n" : $slug} = 1;
    }
    close $fh;
    return \%a;
}

# links(FILE, LINES): the links to headings that land nowhere
sub links {
    my ($file, $lines) = @_;
    (my $dir = $file) =~ s{[^/]*$}{};
    my @bad;
    my $fence = 0;
    for my $k (0 .. $#$lines) {
        my $l = $lines->[$k];
        $fence = !$fence if $l =~ /^\s*```/;
        next if $fence;
        while ($l =~ /\]\(([^)\s]*?)#([^)\s]+)\)/g) {
            my ($target, $anchor) = ($1, $2);
            next if $target =~ /^\w+:/;
            my $t = $target eq '' ? $file : "$dir$target";
            push @bad, "$file:" . ($k + 1) . ": #$anchor is no heading of $t"
                unless anchors($t)->{$anchor};
        }
    }
    return @bad;
}

# psql(DB, INPUT): what psql prints for INPUT on stdin
sub psql {
    my ($db, $input) = @_;
    my $in = "$tmp/in.sql";
    open my $fh, '>', $in or die;
    print $fh $input;
    close $fh;
    local $ENV{PGTZ} = 'UTC';
    return scalar `psql -X -q -d '$db' < '$in' 2>&1`;
}

for my $f (@files) {
    my ($spec, $check_cover) = @$f;
    my ($file, $db) = split /=/, $spec, 2;
    ($db = lc $file) =~ s/.*\///, $db =~ s/\W.*//, $db = "doc_$db" unless defined $db;
    my ($lines, $blocks, $problems) = parse($file);
    tap(0, "$_") for @$problems;
    my @bad = links($file, $lines);
    tap(!@bad, "$file: every link to a heading lands on one", @bad);

    my $setup = `psql -X -q -d postgres -c 'DROP DATABASE IF EXISTS "$db"' -c 'CREATE DATABASE "$db"' 2>&1`;
    if ($? != 0) { tap(0, "$file: database $db created", $setup); next; }

    my @examples = grep { $_->{lang} eq 'sql' && !$_->{skip} } @$blocks;
    my $input = '';
    for my $k (0 .. $#examples) {
        $input .= "\\echo '\@\@doc-example $k\@\@'\n$examples[$k]{body}";
    }
    $input .= "\\echo '\@\@doc-example end\@\@'\n";
    my $out = psql($db, $input);
    my %actual;
    my $cur;
    for my $l (split /\n/, $out) {
        if ($l =~ /^\@\@doc-example (\d+|end)\@\@$/) { $cur = $1; $actual{$cur} = ''; next; }
        $actual{defined $cur ? $cur : 'before'} .= "$l\n";
    }
    if ($check_cover) {
        # the functions users call (not the type's I/O, operator and
        # opclass support functions)
        open my $q, '>', "$tmp/functions.sql" or die;
        print $q <<'SQL';
SELECT DISTINCT p.proname FROM pg_proc p
 WHERE p.pronamespace = 'billing'::regnamespace AND p.proname !~ '^_'
   AND NOT EXISTS (SELECT FROM pg_type t WHERE p.oid IN (t.typinput, t.typoutput, t.typreceive, t.typsend))
   AND NOT EXISTS (SELECT FROM pg_operator o WHERE o.oprcode = p.oid)
   AND NOT EXISTS (SELECT FROM pg_amproc a WHERE a.amproc = p.oid)
 ORDER BY 1;
SQL
        close $q;
        my %excused = map { /<!--\s*doc-test:\s*not run:\s*(\w+)/ ? ($1 => 1) : () } @$lines;
        my $code = join "\n", map { $_->{body} } @examples;
        my @missing = grep { !$excused{$_} && $code !~ /\b\Q$_\E\s*\(/ }
            split /\n/, scalar `psql -X -At -d '$db' -f '$tmp/functions.sql' 2>&1`;
        tap(!@missing, "$file: every function of schema billing is called by an example",
            map { "no example calls billing.$_" } @missing);
    }
    for my $k (0 .. $#examples) {
        my $e = $examples[$k];
        my $name = "$file:" . ($e->{start} + 1);
        my $got = $actual{$k};
        if (!defined $got) {
            tap(0, $name, "psql did not reach this example; it printed:", $out);
            next;
        }
        if ($e->{expected}) {
            my ($want, $have) = (normalize($e->{expected}{body}), normalize($got));
            if ($want eq $have) { tap(1, $name); next; }
            open my $w, '>', "$tmp/expected" or die; print $w $want; close $w;
            open my $h, '>', "$tmp/actual" or die; print $h $have; close $h;
            my $diff = `diff -u "$tmp/expected" "$tmp/actual"`;
            $diff =~ s/^(---|\+\+\+) .*\n//mg;
            tap(0, "$name: the output differs from the doc (- doc, + psql)", $diff);
        } elsif ($got =~ /^(ERROR|FATAL|PANIC):|^psql:/m) {
            tap(0, "$name: an example without an output block failed", $got);
        } else {
            tap(1, $name);
        }
    }
    if ($accept) {
        my @new = @$lines;
        # replace from the bottom so that line numbers stay valid
        for my $k (reverse 0 .. $#examples) {
            my $e = $examples[$k];
            next unless $e->{expected} && defined $actual{$k};
            my $o = $e->{expected};
            my ($indent) = $new[$o->{start}] =~ /^(\s*)/;
            my @body = map { $_ eq '' ? '' : "$indent$_" } split /\n/, normalize($actual{$k});
            splice @new, $o->{start} + 1, $o->{end} - $o->{start} - 1, @body;
        }
        open my $fh, '>', "$file.out" or die;
        print $fh map { "$_\n" } @new;
        close $fh;
        print "# wrote $file.out\n";
    }
}
print "# $n examples and checks, $failed failed\n";
exit($failed ? 1 : 0);
