#!/usr/bin/perl
# check_meta.pl META.json: validates a PGXN distribution's META.json against
# the PGXN Meta Spec 1.0.x (https://pgxn.org/meta/spec.txt): required keys,
# the type and form of every key the spec defines (Term, SemVer, Version
# Range, Path, URI, license names, ...), and no keys it does not define but
# custom "x_" ones.  Prints one line per problem and exits 1, or exits 0.
#
# check_meta.pl --self-test META.json: breaks a valid META.json in each of
# the ways listed at the end of this file and checks that every broken copy
# is rejected (so that the checker can fail); prints TAP lines.
#
# Only core Perl modules (JSON::PP), so it runs wherever PostgreSQL's
# build and test tools do.
use strict;
use warnings;
use JSON::PP ();

my $SEMVER = qr/(?:0|[1-9]\d*)\.(?:0|[1-9]\d*)\.(?:0|[1-9]\d*)
                (?:-(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*)?
                (?:\+[0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*)?/x;
my %LICENSES = map { $_ => 1 } qw(
    agpl_3 apache_1_1 apache_2_0 artistic_1 artistic_2 bsd freebsd gfdl_1_2 gfdl_1_3
    gpl_1 gpl_2 gpl_3 lgpl_2_1 lgpl_3_0 mit mozilla_1_0 mozilla_1_1 openssl perl_5
    postgresql qpl_1_0 ssleay sun zlib open_source restricted unrestricted unknown);
my @REQUIRED = qw(name version abstract maintainer license provides meta-spec);
my %TOP = map { $_ => 1 } (@REQUIRED, qw(description generated_by tags no_index prereqs
                                         release_status resources));

my @problems;
sub problem { push @problems, "$_[0]: $_[1]" }

sub is_obj { ref $_[0] eq 'HASH' }
sub is_arr { ref $_[0] eq 'ARRAY' }
sub is_str { defined $_[0] && !ref $_[0] && !JSON::PP::is_bool($_[0]) }
sub custom { $_[0] =~ /^[xX]_./ }

# the keys of an object: the required ones present, no others but custom ones
sub keys_ok {
    my ($where, $obj, $allowed, $required) = @_;
    for my $k (@{ $required || [] }) {
        problem($where, "required key \"$k\" is missing") unless exists $obj->{$k};
    }
    for my $k (sort keys %$obj) {
        problem($where, "unknown key \"$k\" (custom keys start with x_)")
            unless $allowed->{$k} || custom($k);
    }
}
sub string_ok {     # a String of at least $min characters
    my ($where, $v, $min) = @_;
    return problem($where, 'must be a string') unless is_str($v);
    problem($where, "must be at least $min character(s) long") if length($v) < $min;
    return 1;
}
sub term_ok {
    my ($where, $v) = @_;
    return unless string_ok($where, $v, 2);
    problem($where, "\"$v\" is not a Term (no slash, backslash, space or control characters)")
        if $v =~ m{[/\\\s[:cntrl:]]};
}
sub tag_ok {
    my ($where, $v) = @_;
    return unless string_ok($where, $v, 2);
    problem($where, 'a tag has at most 255 characters') if length($v) > 255;
    problem($where, "\"$v\" is not a Tag (no slash, backslash or control characters)")
        if $v =~ m{[/\\[:cntrl:]]};
}
sub semver_ok {
    my ($where, $v) = @_;
    return problem($where, 'must be a SemVer string') unless is_str($v);
    problem($where, "\"$v\" is not a SemVer version (major.minor.patch)") unless $v =~ /^$SEMVER$/;
}
sub range_ok {      # a Version Range: 0, or SemVer with an operator, AND-ed by commas
    my ($where, $v) = @_;
    return if defined $v && !ref $v && $v =~ /^0$/;
    return problem($where, 'must be a version range string or 0') unless is_str($v);
    for my $part (split /,/, $v, -1) {
        problem($where, "\"$v\" is not a version range") unless $part =~ /^\s*(?:(?:[=!]=|[<>]=?)\s*)?$SEMVER\s*$/;
    }
}
sub path_ok {
    my ($where, $v) = @_;
    return unless string_ok($where, $v, 2);
    problem($where, "\"$v\" is not a relative path in unix form")
        if $v =~ m{^/|\\} || grep { $_ eq '' || $_ eq '..' } split m{/}, $v, -1;
}
sub uri_ok {
    my ($where, $v) = @_;
    return unless string_ok($where, $v, 1);
    problem($where, "\"$v\" is not a URI") unless $v =~ /^[A-Za-z][A-Za-z0-9+.-]*:[^\s]+$/;
}
sub email_ok {
    my ($where, $v) = @_;
    return unless string_ok($where, $v, 1);
    problem($where, "\"$v\" is not an email address") unless $v =~ /^[^@\s]+@[^@\s]+\.[^@\s.]+$/;
}
sub list_ok {       # a non-empty array of unique items, each checked by $item
    my ($where, $v, $item) = @_;
    return problem($where, 'must be a non-empty array') unless is_arr($v) && @$v;
    my %seen;
    for my $i (0 .. $#$v) {
        $item->("$where\[$i]", $v->[$i]);
        problem($where, 'items must be unique') if is_str($v->[$i]) && $seen{ $v->[$i] }++;
    }
}

sub validate {
    my ($meta) = @_;
    @problems = ();
    return ('top: META.json must hold a JSON object') unless is_obj($meta);
    keys_ok('top', $meta, \%TOP, \@REQUIRED);

    term_ok('name', $meta->{name}) if exists $meta->{name};
    semver_ok('version', $meta->{version}) if exists $meta->{version};
    for my $k (qw(abstract description generated_by)) {
        string_ok($k, $meta->{$k}, 1) if exists $meta->{$k};
    }
    if (exists $meta->{maintainer}) {
        my $m = $meta->{maintainer};
        is_arr($m) ? list_ok('maintainer', $m, sub { string_ok($_[0], $_[1], 1) })
                   : string_ok('maintainer', $m, 1);
    }
    if (exists $meta->{license}) {
        my $l = $meta->{license};
        my $name_ok = sub {
            my ($w, $v) = @_;
            problem($w, (is_str($v) ? "\"$v\"" : 'value') . ' is not a license name of the spec (e.g. postgresql, mit, bsd)')
                unless is_str($v) && $LICENSES{$v};
        };
        if (is_obj($l)) {
            problem('license', 'must name at least one license') unless %$l;
            uri_ok("license.$_", $l->{$_}) for sort keys %$l;
        } elsif (is_arr($l)) {
            list_ok('license', $l, $name_ok);
        } else {
            $name_ok->('license', $l);
        }
    }
    if (exists $meta->{provides}) {
        my $p = $meta->{provides};
        if (!is_obj($p) || !%$p) {
            problem('provides', 'must be an object naming at least one extension');
        } else {
            for my $ext (sort keys %$p) {
                my $w = "provides.$ext";
                term_ok("$w (name)", $ext);
                my $e = $p->{$ext};
                unless (is_obj($e)) { problem($w, 'must be an object'); next }
                keys_ok($w, $e, { map { $_ => 1 } qw(file version abstract docfile docpath) },
                        [qw(file version)]);
                path_ok("$w.file", $e->{file}) if exists $e->{file};
                semver_ok("$w.version", $e->{version}) if exists $e->{version};
                path_ok("$w.docfile", $e->{docfile}) if exists $e->{docfile};
                string_ok("$w.$_", $e->{$_}, 1) for grep { exists $e->{$_} } qw(abstract docpath);
            }
        }
    }
    if (exists $meta->{'meta-spec'}) {
        my $s = $meta->{'meta-spec'};
        if (!is_obj($s)) {
            problem('meta-spec', 'must be an object');
        } else {
            keys_ok('meta-spec', $s, { version => 1, url => 1 }, ['version']);
            problem('meta-spec.version', 'must be 1.0.x')
                if exists $s->{version} && !(is_str($s->{version}) && $s->{version} =~ /^1\.0\.\d+$/);
            problem('meta-spec.url', 'must be https://pgxn.org/meta/spec.txt')
                if exists $s->{url} && !(is_str($s->{url}) && $s->{url} =~ m{^https?://pgxn\.org/meta/spec\.txt$});
        }
    }
    list_ok('tags', $meta->{tags}, \&tag_ok) if exists $meta->{tags};
    if (exists $meta->{no_index}) {
        my $n = $meta->{no_index};
        if (!is_obj($n)) {
            problem('no_index', 'must be an object');
        } else {
            keys_ok('no_index', $n, { file => 1, directory => 1 });
            problem('no_index', 'must list a file or a directory') unless exists $n->{file} || exists $n->{directory};
            for my $k (grep { exists $n->{$_} } qw(file directory)) {
                is_arr($n->{$k}) ? list_ok("no_index.$k", $n->{$k}, \&path_ok) : path_ok("no_index.$k", $n->{$k});
            }
        }
    }
    if (exists $meta->{prereqs}) {
        my $pr = $meta->{prereqs};
        my %phases = map { $_ => 1 } qw(configure build test runtime develop);
        my %rels = map { $_ => 1 } qw(requires recommends suggests conflicts);
        if (!is_obj($pr)) {
            problem('prereqs', 'must be an object');
        } else {
            keys_ok('prereqs', $pr, \%phases);
            problem('prereqs', 'must name at least one phase') unless grep { $phases{$_} } keys %$pr;
            for my $ph (grep { $phases{$_} } sort keys %$pr) {
                my $w = "prereqs.$ph";
                unless (is_obj($pr->{$ph})) { problem($w, 'must be an object'); next }
                keys_ok($w, $pr->{$ph}, \%rels);
                problem($w, 'must name at least one relationship') unless grep { $rels{$_} } keys %{ $pr->{$ph} };
                for my $rel (grep { $rels{$_} } sort keys %{ $pr->{$ph} }) {
                    my $r = $pr->{$ph}{$rel};
                    unless (is_obj($r) && %$r) { problem("$w.$rel", 'must be a non-empty object'); next }
                    for my $dep (sort keys %$r) {
                        term_ok("$w.$rel.$dep (name)", $dep);
                        range_ok("$w.$rel.$dep", $r->{$dep});
                    }
                }
            }
        }
    }
    problem('release_status', 'must be stable, testing or unstable')
        if exists $meta->{release_status}
           && !(is_str($meta->{release_status}) && $meta->{release_status} =~ /^(stable|testing|unstable)$/);
    if (exists $meta->{resources}) {
        my $r = $meta->{resources};
        if (!is_obj($r)) {
            problem('resources', 'must be an object');
        } else {
            keys_ok('resources', $r, { homepage => 1, bugtracker => 1, repository => 1 });
            problem('resources', 'must give a homepage, a bugtracker or a repository')
                unless grep { exists $r->{$_} } qw(homepage bugtracker repository);
            uri_ok('resources.homepage', $r->{homepage}) if exists $r->{homepage};
            if (exists $r->{bugtracker}) {
                my $b = $r->{bugtracker};
                if (!is_obj($b)) {
                    problem('resources.bugtracker', 'must be an object');
                } else {
                    keys_ok('resources.bugtracker', $b, { web => 1, mailto => 1 });
                    problem('resources.bugtracker', 'must give web or mailto') unless exists $b->{web} || exists $b->{mailto};
                    uri_ok('resources.bugtracker.web', $b->{web}) if exists $b->{web};
                    email_ok('resources.bugtracker.mailto', $b->{mailto}) if exists $b->{mailto};
                }
            }
            if (exists $r->{repository}) {
                my $g = $r->{repository};
                if (!is_obj($g)) {
                    problem('resources.repository', 'must be an object');
                } else {
                    keys_ok('resources.repository', $g, { url => 1, web => 1, type => 1 });
                    problem('resources.repository', 'must give url and type, or web')
                        unless (exists $g->{url} && exists $g->{type}) || exists $g->{web};
                    uri_ok("resources.repository.$_", $g->{$_}) for grep { exists $g->{$_} } qw(url web);
                    problem('resources.repository.type', 'must be a lower-case word (git, hg, ...)')
                        if exists $g->{type} && !(is_str($g->{type}) && $g->{type} =~ /^[a-z]+$/);
                }
            }
        }
    }
    return @problems;
}

sub load {
    my ($file) = @_;
    open my $fh, '<:raw', $file or die "$file: $!\n";
    local $/;
    my $text = <$fh>;
    return JSON::PP->new->utf8->decode($text);
}

# ways to break a valid META.json, each of which the checker must reject
my @BREAKS = (
    [ 'no name',                     sub { delete $_[0]{name} } ],
    [ 'a one-letter name',           sub { $_[0]{name} = 'b' } ],
    [ 'a name with a space',         sub { $_[0]{name} = 'bill ing' } ],
    [ 'no abstract',                 sub { delete $_[0]{abstract} } ],
    [ 'an empty abstract',           sub { $_[0]{abstract} = '' } ],
    [ 'no maintainer',               sub { delete $_[0]{maintainer} } ],
    [ 'an empty maintainer list',    sub { $_[0]{maintainer} = [] } ],
    [ 'no license',                  sub { delete $_[0]{license} } ],
    [ 'an unknown license name',     sub { $_[0]{license} = 'postgres' } ],
    [ 'a license map without a URI', sub { $_[0]{license} = { PostgreSQL => 'the usual' } } ],
    [ 'a two-part version',          sub { $_[0]{version} = '1.1' } ],
    [ 'a version with a v',          sub { $_[0]{version} = 'v1.1.0' } ],
    [ 'a number for a version',      sub { $_[0]{version} = 1.1 } ],
    [ 'no provides',                 sub { delete $_[0]{provides} } ],
    [ 'an empty provides',           sub { $_[0]{provides} = {} } ],
    [ 'an extension without file',   sub { delete((values %{ $_[0]{provides} })[0]->{file}) } ],
    [ 'an extension without version', sub { delete((values %{ $_[0]{provides} })[0]->{version}) } ],
    [ 'an absolute file path',       sub { (values %{ $_[0]{provides} })[0]->{file} = '/sql/x.sql' } ],
    [ 'an unknown extension key',    sub { (values %{ $_[0]{provides} })[0]->{docs} = 'doc/x.md' } ],
    [ 'no meta-spec',                sub { delete $_[0]{'meta-spec'} } ],
    [ 'meta-spec version 2.0.0',     sub { $_[0]{'meta-spec'}{version} = '2.0.0' } ],
    [ 'an unknown top-level key',    sub { $_[0]{homepage} = 'https://example.org/' } ],
    [ 'a tag with a slash',          sub { $_[0]{tags} = ['a/b'] } ],
    [ 'an empty tag list',           sub { $_[0]{tags} = [] } ],
    [ 'an unknown prereq phase',     sub { $_[0]{prereqs}{install} = { requires => { PostgreSQL => '15.0.0' } } } ],
    [ 'an unknown relationship',     sub { $_[0]{prereqs}{runtime} = { needs => { PostgreSQL => '15.0.0' } } } ],
    [ 'a version range ">= 15"',     sub { $_[0]{prereqs}{runtime} = { requires => { PostgreSQL => '>= 15' } } } ],
    [ 'an empty prereqs',            sub { $_[0]{prereqs} = {} } ],
    [ 'release_status "final"',      sub { $_[0]{release_status} = 'final' } ],
    [ 'empty resources',             sub { $_[0]{resources} = {} } ],
    [ 'a bugtracker mailto without @', sub { $_[0]{resources} = { bugtracker => { mailto => 'nobody' } } } ],
    [ 'a homepage that is no URI',   sub { $_[0]{resources} = { homepage => 'our site' } } ],
    [ 'a repository url without type', sub { $_[0]{resources} = { repository => { url => 'https://example.org/r.git' } } } ],
);

if (@ARGV == 2 && $ARGV[0] eq '--self-test') {
    my $json = JSON::PP->new->utf8->canonical;
    my $text = $json->encode(load($ARGV[1]));
    my ($n, $bad) = (0, 0);
    my @p = validate($json->decode($text));
    $n++;
    if (@p) { $bad++; print "not ok $n - $ARGV[1] validates\n"; print "#   $_\n" for @p; }
    else    { print "ok $n - $ARGV[1] validates\n"; }
    my @missed;
    for my $b (@BREAKS) {
        my $meta = $json->decode($text);
        $b->[1]->($meta);
        push @missed, $b->[0] unless validate($meta);
    }
    $n++;
    if (@missed) {
        $bad++;
        print "not ok $n - the META.json checker rejects each of ", scalar(@BREAKS), " broken copies\n";
        print "#   accepted: $_\n" for @missed;
    } else {
        print "ok $n - the META.json checker rejects each of ", scalar(@BREAKS), " broken copies (missing keys, bad names, versions, licenses, paths, ranges, resources)\n";
    }
    exit($bad ? 1 : 0);
}

die "usage: $0 [--self-test] META.json\n" unless @ARGV == 1;
my $meta = eval { load($ARGV[0]) };
if (!defined $meta) {
    print "$ARGV[0]: not valid JSON: $@";
    exit 1;
}
my @p = validate($meta);
print "$ARGV[0]: $_\n" for @p;
exit(@p ? 1 : 0);
